"""Tables copied over several connections: one snapshot for all of them, the same fakes as
one connection gives, and a failure or a signal on any connection stops every statement."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from app import allowlist, catalog, db, ddl, plan, scrub
from app import config as configuration
from app.scrub import ScratchSchema
from tests import jobrun
from tests.conftest import Server
from tests.jobrun import SCRATCH
from tests.seed import demo

# Each faked row sleeps 10 ms in the copy (the CHECK comes with it), so copying either
# table takes 40 s: far longer than a run that stops promptly may take.
SLOW_TABLES = """
CREATE TABLE slow_a AS SELECT i AS id, 'a' || i AS email FROM generate_series(1, 4000) i;
CREATE TABLE slow_b AS SELECT i AS id, 'b' || i AS email FROM generate_series(1, 4000) i;
ALTER TABLE slow_a ADD PRIMARY KEY (id),
    ADD CONSTRAINT slow CHECK (email NOT LIKE 'email%' OR length(pg_sleep(0.01)::text) = 0);
ALTER TABLE slow_b ADD PRIMARY KEY (id),
    ADD CONSTRAINT slow CHECK (email NOT LIKE 'email%' OR length(pg_sleep(0.01)::text) = 0);
"""
PROMPTLY = 25  # seconds


def _allow(tmp_path: Path, allow: dict[str, list[str]]) -> Path:
    path = tmp_path / "allow.json"
    path.write_text(json.dumps(allow))
    return path


def _job_sessions(url: str) -> list[tuple[Any, ...]]:
    return jobrun.rows(
        url,
        "SELECT pid, state, query FROM pg_stat_activity WHERE application_name ="
        " 'sanitised-dump' AND datname = current_database()",
    )


def _still_running(url: str) -> list[str]:
    """Statements of the job the server still runs (a session merely closing is idle)."""
    return [r[2] for r in _job_sessions(url) if r[1] == "active"]


def _wait_for_inserts(url: str, count: int, job: Any) -> None:
    for _ in range(400):
        running = [r for r in _job_sessions(url) if r[1] == "active" and "INSERT" in r[2]]
        if len(running) >= count or job.poll() is not None:
            break
        time.sleep(0.02)
    assert len(running) >= count, "the copies never ran side by side"


@pytest.mark.one_major
@pytest.mark.parametrize("sliced", [False, True], ids=["whole-tables", "sliced-tables"])
def test_every_connection_copies_from_the_snapshot_of_the_first(
    pg_server: Server,
    source_db: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    sliced: bool,
) -> None:
    """Rows committed after the copy's snapshot, while the connections are being opened,
    are in no copied table, whichever connection copies it; a table copied in slices gets
    the very fakes one statement gives."""
    # The slices' bounds come from the row estimate of the last ANALYZE: too high for a
    # (rows deleted since), too low for b (rows added since), right for c.
    analyzed = {"a": 3000, "b": 1000, "c": 1000}
    sizes = {"a": 1500, "b": 2000, "c": 1000}
    with psycopg.connect(source_db) as conn:
        for table, rows in analyzed.items():
            conn.execute(
                sql.SQL(
                    "CREATE TABLE {t} (id int PRIMARY KEY, email text UNIQUE);"
                    "INSERT INTO {t} SELECT i, {t_} || i FROM generate_series(1, {n}) i;"
                    "ANALYZE {t};"
                    "DELETE FROM {t} WHERE id > {m};"
                    "INSERT INTO {t} SELECT i, {t_} || i FROM generate_series({n} + 1, {m}) i;"
                ).format(
                    t=sql.Identifier(table),
                    t_=sql.Literal(table),
                    n=sql.Literal(rows),
                    m=sql.Literal(sizes[table]),
                )
            )
    if sliced:
        monkeypatch.setattr(scrub, "MIN_SLICE_BYTES", 0)
    slices: list[ddl.Chunk | None] = []
    insert_rows = ddl.insert_rows

    def spy(tp: Any, place: Any, rows: ddl.Chunk | None = None) -> sql.Composed:
        slices.append(rows)
        return insert_rows(tp, place, rows)

    monkeypatch.setattr(ddl, "insert_rows", spy)
    allow = _allow(tmp_path, {t: ["id"] for t in sizes})
    config = configuration.load({"DATABASE_URL": source_db, "ALLOW_LIST": str(allow)})
    late = 10_000

    def connect_after_a_commit() -> psycopg.Connection[Any]:
        nonlocal late
        late += 1
        with psycopg.connect(source_db, autocommit=True) as writer:
            for table in sizes:
                writer.execute(
                    sql.SQL("INSERT INTO {} VALUES (%s, 'late' || %s)").format(
                        sql.Identifier(table)
                    ),
                    [late, late],
                )
        return db.connect(config)

    with db.connect(config) as work:
        work.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        the_plan = plan.build(
            catalog.read(work, allowlist.load(config.allow_list), SCRATCH), SCRATCH
        )
        scratch = ScratchSchema(work, the_plan, connect=connect_after_a_commit, connections=3)
        try:
            results = scratch.build()
            work.commit()
            copied = {
                tp.table.name: jobrun.rows(
                    source_db,
                    sql.SQL("SELECT * FROM {} ORDER BY id").format(
                        sql.Identifier(SCRATCH, tp.table.name)
                    ),
                )
                for tp in the_plan.tables
            }
            one_statement = {
                tp.table.name: jobrun.rows(
                    source_db,
                    sql.SQL("SELECT * FROM ({}) AS c WHERE id <= 10000 ORDER BY id").format(
                        ddl.select_rows(tp)
                    ),
                )
                for tp in the_plan.tables
            }
        finally:
            work.rollback()
            scratch.drop()
            work.commit()
    assert late == 10_003, "three connections were opened"
    assert len(slices) > len(sizes) if sliced else slices == [None] * len(sizes)
    assert {r.table: r.rows for r in results} == {f"public.{t}": n for t, n in sizes.items()}
    assert {t: len(rows) for t, rows in copied.items()} == sizes
    assert copied == one_statement
    assert copied["a"][0][1] != "a1"


@pytest.mark.one_major
def test_one_or_several_connections_give_the_same_dump(
    pg_server: Server, source_db: str, tmp_path: Path
) -> None:
    with psycopg.connect(source_db) as conn:
        demo.load(conn)
    restored = {}
    for connections in ("1", "3"):
        storage = tmp_path / connections
        storage.mkdir()
        env = jobrun.job_env(source_db, storage, pg_server.bindir, COPY_CONNECTIONS=connections)
        result = jobrun.run(env, "dump")
        assert result.returncode == 0, result.stderr
        target = pg_server.create_database()
        assert jobrun.restore(pg_server.bindir, storage / "sanitised.dump", target).returncode == 0
        restored[connections] = {
            table: jobrun.rows(
                target,
                sql.SQL("SELECT t::text FROM {} t ORDER BY 1").format(
                    sql.Identifier(SCRATCH, table.split(".")[1])
                ),
            )
            for table in demo.TABLES
            if table not in demo.UNLISTED
        }
        pg_server.drop_database(target.rsplit("/", 1)[1])
    assert all(restored["1"][t] for t in restored["1"])
    assert restored["1"] == restored["3"]


@pytest.mark.one_major
def test_a_fake_rejected_on_one_connection_stops_the_others(
    pg_server: Server, source_db: str, tmp_path: Path
) -> None:
    with psycopg.connect(source_db) as conn:
        conn.execute(SLOW_TABLES)
        conn.execute(
            "CREATE TABLE picky (id int PRIMARY KEY, email text CHECK (email LIKE '%@%'));"
            "INSERT INTO picky SELECT i, i || '@example.org' FROM generate_series(1, 10) i;"
        )
    allow = _allow(tmp_path, {"slow_a": ["id"], "picky": ["id"]})
    env = jobrun.job_env(source_db, tmp_path, pg_server.bindir, ALLOW_LIST=str(allow))
    result = jobrun.run(env, "dump", timeout=PROMPTLY)
    assert result.returncode == 3, result.stderr
    assert "picky" in result.logs[-1]["message"]
    assert "picky_email_check" in result.logs[-1]["message"]
    assert _still_running(source_db) == []
    assert SCRATCH not in jobrun.schemas(source_db)
    assert not (tmp_path / "sanitised.dump").exists()
    assert jobrun.temp_files(tmp_path) == []


@pytest.mark.one_major
def test_sigterm_cancels_the_copy_on_every_connection(
    pg_server: Server, source_db: str, tmp_path: Path
) -> None:
    with psycopg.connect(source_db) as conn:
        conn.execute(SLOW_TABLES)
    allow = _allow(tmp_path, {"slow_a": ["id"], "slow_b": ["id"]})
    env = jobrun.job_env(source_db, tmp_path, pg_server.bindir, ALLOW_LIST=str(allow))
    job = jobrun.start(env, "dump")
    try:
        _wait_for_inserts(source_db, 2, job)
        job.send_signal(signal.SIGTERM)
        _, err = job.communicate(timeout=PROMPTLY)
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
    assert job.returncode == 128 + signal.SIGTERM, err
    assert _still_running(source_db) == []
    assert SCRATCH not in jobrun.schemas(source_db)
    assert jobrun.temp_files(tmp_path) == []
