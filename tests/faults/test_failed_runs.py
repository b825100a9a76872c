"""A run that fails, wherever it fails, leaves the source and the storage folder as they were:
no scratch schema, no `tmp-sanitised-dump-*` file, the previously published dump untouched."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from tests import jobrun, pgbin
from tests.faults import harness
from tests.faults.harness import Source

REPORT_SECTION = "Failed runs leave nothing behind"


def error_of(result: jobrun.Result) -> str:
    """The message of the run's final error line."""
    errors = [line for line in result.logs if line.get("level") == "ERROR"]
    assert errors, result.stderr
    assert errors[-1]["exit_code"] == result.returncode
    return str(errors[-1]["message"])


def script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body, encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.mark.fault(
    "allow list keeps a column the table does not have",
    "exit 3 naming the column and the entry; nothing written",
)
def test_missing_column(source: Source, observe: Callable[[str], None]) -> None:
    source.write_allow({"people": ["id", "nickname"]})
    result = source.run()
    assert result.returncode == 3, result.stderr
    message = error_of(result)
    assert "'nickname'" in message and "entry 'people'" in message
    observe(f"exit {result.returncode}")
    source.assert_clean()


@pytest.mark.fault(
    "allow list names a table that does not exist (a case slip: `People`)",
    "exit 3 naming the entry and suggesting the real table",
)
def test_missing_table(source: Source, observe: Callable[[str], None]) -> None:
    source.write_allow({"people": ["id"], "People": []})
    result = source.run()
    assert result.returncode == 3, result.stderr
    message = error_of(result)
    assert "entry 'People'" in message and "did you mean public.people" in message
    observe(f"exit {result.returncode}")
    source.assert_clean()


@pytest.mark.fault(
    "a column of type `point` that is not kept (no fake exists for it)",
    "exit 3 naming table, column and type before anything is written",
)
def test_unfakeable_type(source: Source, observe: Callable[[str], None]) -> None:
    source.execute("ALTER TABLE people ADD COLUMN location point DEFAULT point(1, 2)")
    result = source.run()
    assert result.returncode == 3, result.stderr
    message = error_of(result)
    assert "public.people.location" in message and "point" in message
    observe(f"exit {result.returncode}")
    source.assert_clean()


@pytest.mark.fault(
    "a CHECK rejects the fake of a column (found only during the copy)",
    "exit 3 naming the table and the constraint; the copy rolled back",
)
def test_check_rejects_a_fake(source: Source, observe: Callable[[str], None]) -> None:
    source.execute(
        "ALTER TABLE people ADD CONSTRAINT note_is_real CHECK (note LIKE 'canary note %')"
    )
    result = source.run()
    assert result.returncode == 3, result.stderr
    message = error_of(result)
    assert "public.people" in message and "note_is_real" in message
    observe(f"exit {result.returncode}")
    source.assert_clean()


@pytest.mark.fault("PG_DUMP names a binary that does not exist", "exit 5 naming PG_DUMP")
def test_pg_dump_missing(source: Source, tmp_path: Path, observe: Callable[[str], None]) -> None:
    result = source.run(PG_DUMP=str(tmp_path / "no-such-pg_dump"))
    assert result.returncode == 5, result.stderr
    assert "PG_DUMP" in error_of(result)
    observe(f"exit {result.returncode}")
    source.assert_clean()


@pytest.mark.one_major
@pytest.mark.fault(
    "pg_dump of an older major than the server",
    "exit 5 naming both majors, before anything is written",
)
def test_pg_dump_older_than_the_server(
    source: Source, tmp_path: Path, observe: Callable[[str], None]
) -> None:
    major = source.server.major
    cached = [
        pgbin.cache_root() / version / "bin" / "pg_dump"
        for m, version in sorted(pgbin.VERSIONS.items())
        if m < major
    ]
    if cached and cached[0].exists():
        older = cached[0]
    else:  # no older binary at hand (an image without them): one that says it is older
        older = script(tmp_path / "pg_dump", f'echo "pg_dump (PostgreSQL) {major - 1}.9"\n')
    result = source.run(PG_DUMP=str(older))
    assert result.returncode == 5, result.stderr
    message = error_of(result)
    assert f"older than the server ({major})" in message
    observe(f"exit {result.returncode}")
    source.assert_clean()


@pytest.mark.one_major
@pytest.mark.fault(
    "pg_dump fails half-way: its server session is terminated while it reads the schema",
    "exit 5 with pg_dump's error; scratch schema dropped, partial file removed",
)
def test_pg_dump_fails_half_way(source: Source, observe: Callable[[str], None]) -> None:
    with harness.pg_dump_stuck(source.url) as stuck:
        job = source.start()
        backend = stuck.wait(job)
        source.execute("SELECT pg_terminate_backend(%s)", [backend])
        result = harness.finish(job)
    assert result.returncode == 5, result.stderr
    assert "pg_dump failed" in error_of(result)
    observe(f"exit {result.returncode}")
    source.assert_clean()


@pytest.mark.fault(
    "pg_dump writes part of the dump, then exits 1",
    "exit 5; the partial file removed; the previous dump untouched",
)
def test_pg_dump_writes_part_then_fails(
    source: Source, tmp_path: Path, observe: Callable[[str], None]
) -> None:
    real = source.server.bindir / "pg_dump"
    fake = script(
        tmp_path / "pg_dump",
        f'case "$1" in --version) exec "{real}" --version;; esac\n'
        'for arg; do case "$arg" in --file=*) out="${arg#--file=}";; esac; done\n'
        'printf "PGDMP half a dump" > "$out"\n'
        'echo "pg_dump: error: could not write to output file: Input/output error" >&2\n'
        "exit 1\n",
    )
    result = source.run(PG_DUMP=str(fake))
    assert result.returncode == 5, result.stderr
    assert "Input/output error" in error_of(result)
    observe(f"exit {result.returncode}")
    source.assert_clean()


def test_a_run_after_the_failures_publishes(source: Source) -> None:
    """The clean state above is one the job can start from: the next run works."""
    result = source.run()
    assert result.returncode == 0, result.stderr
    assert source.dump.read_bytes() != source.previous
    assert jobrun.temp_files(source.storage) == []
    with psycopg.connect(source.url) as conn:
        assert conn.execute("SELECT count(*) FROM people").fetchone() == (harness.ROWS,)
