"""UNLOGGED scratch tables and unchecked foreign keys: next to no WAL and no second check on
the source, ordinary tables and checked foreign keys after a restore."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import psycopg
import pytest

from app import toc
from app.errors import PgDumpError
from tests import jobrun
from tests.conftest import Server
from tests.jobrun import SCRATCH

SOURCE = """
CREATE TABLE accounts (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    email text UNIQUE NOT NULL,
    notes text
);
CREATE TABLE visits (
    id serial PRIMARY KEY,
    account_id bigint NOT NULL REFERENCES accounts (id),
    page text NOT NULL
);
INSERT INTO accounts (email, notes)
SELECT 'person' || i || '@example.org', repeat(md5(i::text), 6) FROM generate_series(1, 10000) i;
INSERT INTO visits (account_id, page)
SELECT 1 + i % 10000, '/page/' || repeat(md5(i::text), 4) FROM generate_series(1, 20000) i;
"""
ALLOW = {"accounts": ["id"], "visits": ["id", "account_id", "page"]}


def _wal_lsn(url: str) -> str:
    return str(jobrun.rows(url, "SELECT pg_current_wal_insert_lsn()::text")[0][0])


def _wal_since(url: str, start: str) -> int:
    rows = jobrun.rows(url, "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), %s)", [start])
    return int(rows[0][0])


@pytest.mark.parametrize("mode", ["schema", "database"])
def test_unlogged_copy_writes_little_wal_and_restores_like_the_source(
    pg_server: Server, source_db: str, tmp_path: Path, mode: str
) -> None:
    """In the default mode the WAL is the source's; with SCRATCH_DATABASE_URL (a database of
    the same cluster here) it is the scratch server's, as the source is only read."""
    with psycopg.connect(source_db) as conn:
        conn.execute(SOURCE)
    heap = int(
        jobrun.rows(source_db, "SELECT pg_table_size('accounts') + pg_table_size('visits')")[0][0]
    )
    allow = tmp_path / "allow.json"
    allow.write_text(json.dumps(ALLOW))
    schema = SCRATCH if mode == "schema" else "public"
    wal = {}
    for unlogged in ("true", "false"):
        storage = tmp_path / unlogged
        storage.mkdir()
        extra = {"ALLOW_LIST": str(allow), "SCRATCH_UNLOGGED": unlogged}
        scratch = pg_server.create_database() if mode == "database" else None
        if scratch:
            extra["SCRATCH_DATABASE_URL"] = scratch
        env = jobrun.job_env(source_db, storage, pg_server.bindir, **extra)
        start = _wal_lsn(source_db)
        result = jobrun.run(env, "dump")
        wal[unlogged] = _wal_since(source_db, start)
        assert result.returncode == 0, result.stderr
        if scratch:
            pg_server.drop_database(scratch.rsplit("/", 1)[1])
        target = pg_server.create_database()
        try:
            restored = jobrun.restore(pg_server.bindir, storage / "sanitised.dump", target)
            assert restored.returncode == 0, restored.stderr
            persistence = jobrun.rows(
                target,
                "SELECT c.relname, c.relkind, c.relpersistence FROM pg_class c"
                " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s"
                " ORDER BY 1",
                [schema],
            )
            foreign_keys = jobrun.rows(
                target,
                "SELECT conname, convalidated FROM pg_constraint WHERE contype = 'f'",
            )
            counts = jobrun.rows(
                target,
                f"SELECT (SELECT count(*) FROM {schema}.accounts),"
                f" (SELECT count(*) FROM {schema}.visits)",
            )
        finally:
            pg_server.drop_database(target.rsplit("/", 1)[1])
        assert counts == [(10000, 20000)]
        assert foreign_keys == [("visits_account_id_fkey", True)]
        assert {kind for _, kind, _ in persistence} >= {"r", "i", "S"}
        assert [(name, p) for name, _, p in persistence if p != "p"] == []
    # Logged, the copy writes about its own size into the WAL; unlogged, a small fraction.
    assert wal["false"] > heap / 2
    assert wal["true"] * 10 < wal["false"]


@pytest.mark.one_major
def test_an_archive_that_is_not_what_pg_dump_writes_is_refused(
    pg_server: Server, source_db: str, tmp_path: Path
) -> None:
    with psycopg.connect(source_db) as conn:
        conn.execute("CREATE UNLOGGED TABLE t AS SELECT i AS id FROM generate_series(1, 100) i")
    dump = tmp_path / "t.dump"
    subprocess.run(
        [str(pg_server.bindir / "pg_dump"), "-Fc", f"--file={dump}", source_db], check=True
    )
    assert [e.tag for e in toc.read_toc(dump) if e.desc == b"TABLE"] == [b"t"]
    truncated = tmp_path / "truncated.dump"
    truncated.write_bytes(dump.read_bytes()[:200])
    moved = tmp_path / "moved.dump"
    data = bytearray(dump.read_bytes())
    entry = next(e for e in toc.read_toc(dump) if e.data_at is not None)
    data[entry.data_at : entry.data_at] = b"\x00"  # its data block now starts a byte later
    moved.write_bytes(bytes(data))
    plain = tmp_path / "plain.sql"
    plain.write_text("CREATE UNLOGGED TABLE t (id int);\n")
    for bad in (truncated, moved, plain):
        before = bad.read_bytes()
        with pytest.raises(PgDumpError, match="unexpected custom-format archive"):
            toc.rewrite(bad, [])
        assert bad.read_bytes() == before
    copy = tmp_path / "copy.dump"
    shutil.copy(dump, copy)
    assert toc.rewrite(copy, []) == toc.Rewritten(["t"], [])
    assert toc.rewrite(copy, []) == toc.Rewritten([], [])
    with pytest.raises(PgDumpError, match="no NOT VALID foreign key t t_fkey"):
        toc.rewrite(copy, [("t", "t_fkey")])
