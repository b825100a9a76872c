"""Two runs at once on the same database: one proceeds, the other exits 7 and touches nothing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests import jobrun
from tests.faults import harness
from tests.faults.harness import Source
from tests.faults.test_failed_runs import error_of
from tests.jobrun import SCRATCH

REPORT_SECTION = "Concurrency"


def folder(storage: Path) -> dict[str, tuple[int, int, int]]:
    return {
        p.name: (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns) for p in storage.iterdir()
    }


def scratch_oid(source: Source) -> object:
    rows = source.execute("SELECT oid FROM pg_namespace WHERE nspname = %s", [SCRATCH])
    return rows[0][0] if rows else None


@pytest.mark.one_major
@pytest.mark.parametrize("dump_name", ["sanitised.dump", "other.dump"])
@pytest.mark.fault(
    "a second run (DUMP_NAME={dump_name}) starts while the pg_dump of a first one "
    "(DUMP_NAME=sanitised.dump) runs; the same database and scratch schema",
    "the second exits 7 and leaves the scratch schema and the storage folder as they are; "
    "the first then publishes",
)
def test_second_run_exits_7_and_touches_nothing(
    source: Source, dump_name: str, observe: Callable[[str], None]
) -> None:
    with harness.pg_dump_stuck(source.url) as stuck:
        first = source.start()
        stuck.wait(first)
        before = folder(source.storage)
        assert len(jobrun.temp_files(source.storage)) == 1
        schema = scratch_oid(source)
        assert schema is not None
        second = source.run(DUMP_NAME=dump_name)
        assert second.returncode == 7, second.stderr
        assert "another run holds the lock" in error_of(second)
        assert folder(source.storage) == before
        assert scratch_oid(source) == schema
        assert first.poll() is None
    result = harness.finish(first)
    assert result.returncode == 0, result.stderr
    assert source.dump.read_bytes() != source.previous
    assert jobrun.temp_files(source.storage) == []
    assert SCRATCH not in jobrun.schemas(source.url)
    observe(f"second run: exit {second.returncode}; first run: exit {result.returncode}")
