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

from app import allowlist, catalog, db, plan
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
def test_every_connection_copies_from_the_snapshot_of_the_first(
    pg_server: Server, source_db: str, tmp_path: Path
) -> None:
    """Rows committed after the copy's snapshot, while the extra connections are still being
    opened, are in no copied table, whichever connection copies it."""
    with psycopg.connect(source_db) as conn:
        conn.execute(
            "CREATE TABLE a (id int PRIMARY KEY, email text);"
            "CREATE TABLE b (id int PRIMARY KEY, email text);"
            "CREATE TABLE c (id int PRIMARY KEY, email text);"
            "INSERT INTO a SELECT i, 'a' || i FROM generate_series(1, 30) i;"
            "INSERT INTO b SELECT i, 'b' || i FROM generate_series(1, 20) i;"
            "INSERT INTO c SELECT i, 'c' || i FROM generate_series(1, 10) i;"
        )
    config = configuration.load(
        {"DATABASE_URL": source_db, "ALLOW_LIST": str(_allow(tmp_path, {t: ["id"] for t in "abc"}))}
    )
    late = 1000

    def connect_after_a_commit() -> psycopg.Connection[Any]:
        nonlocal late
        late += 1
        with psycopg.connect(source_db, autocommit=True) as writer:
            for table in "abc":
                writer.execute(
                    sql.SQL("INSERT INTO {} VALUES (%s, 'late')").format(sql.Identifier(table)),
                    [late],
                )
        return db.connect(config)

    with db.connect(config) as work:
        work.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        the_plan = plan.build(
            catalog.read(work, allowlist.load(config.allow_list), SCRATCH), SCRATCH
        )
        scratch = ScratchSchema(work, the_plan, connect_after_a_commit, connections=3)
        try:
            results = scratch.build()
            work.commit()
            copied = {
                t: jobrun.rows(
                    source_db,
                    sql.SQL("SELECT count(*), max(id) FROM {}").format(sql.Identifier(SCRATCH, t)),
                )[0]
                for t in "abc"
            }
        finally:
            work.rollback()
            scratch.drop()
            work.commit()
    assert late == 1002, "two extra connections were opened"
    assert {r.table: r.rows for r in results} == {"public.a": 30, "public.b": 20, "public.c": 10}
    assert copied == {"a": (30, 30), "b": (20, 20), "c": (10, 10)}


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
