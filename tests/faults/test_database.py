"""The database side: a restart mid-copy, a server that refuses connections, timeouts, and a
role with too few (or just enough) privileges."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests import jobrun
from tests.conftest import Server
from tests.faults import harness
from tests.faults.harness import SLOW, Source, as_user
from tests.faults.test_failed_runs import error_of

REPORT_SECTION = "Database"


@pytest.mark.fault(
    "the job's role lacks CREATE on the database",
    "exit 4 naming the CREATE privilege and the GRANT to run; nothing written",
)
def test_role_without_create(source: Source, role: str, observe: Callable[[str], None]) -> None:
    result = jobrun.run({**source.env(), "DATABASE_URL": as_user(source.url, role, "pw")}, "dump")
    assert result.returncode == 4, result.stderr
    message = error_of(result)
    assert "CREATE privilege" in message and "GRANT CREATE ON DATABASE" in message
    observe(f"exit {result.returncode}")
    source.assert_clean()


@pytest.mark.fault(
    "the job's role has only CONNECT and CREATE on the database and SELECT on the listed table",
    "the run succeeds (SPEC §6 needs no more)",
)
def test_least_privileges_suffice(
    source: Source, role: str, target_db: str, observe: Callable[[str], None]
) -> None:
    with psycopg.connect(source.url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
                sql.Identifier(conn.info.dbname), sql.Identifier(role)
            )
        )
    result = jobrun.run({**source.env(), "DATABASE_URL": as_user(source.url, role, "pw")}, "dump")
    assert result.returncode == 0, result.stderr
    restored = jobrun.restore(source.server.bindir, source.dump, target_db)
    assert restored.returncode == 0, restored.stderr
    rows = jobrun.rows(target_db, f"SELECT count(*) FROM {jobrun.SCRATCH}.people")
    assert rows == [(harness.ROWS,)]
    observe(f"exit {result.returncode}, dump restored")


@pytest.mark.one_major
@pytest.mark.fault(
    "the server restarts (`pg_ctl restart -m fast`) while the copy runs",
    "exit 4; nothing published; no scratch schema or temp file afterwards",
)
def test_server_restart_during_the_copy(
    pg_server: Server, source: Source, observe: Callable[[str], None]
) -> None:
    if pg_server.cluster is None:
        pytest.skip("restarting needs a throwaway cluster, not TEST_DATABASE_URL's server")
    job = source.start(PGOPTIONS=SLOW)
    harness.wait_for(lambda: harness.copy_running(source.url), "the copy", process=job)
    pg_server.restart()
    result = harness.finish(job)
    assert result.returncode == 4, result.stderr
    assert "database error" in error_of(result)
    observe(f"exit {result.returncode}")
    source.assert_clean()


@pytest.mark.one_major
@pytest.mark.fault(
    "the server restarts while pg_dump runs (the scratch schema is committed by then)",
    "exit 5; the job reconnects, takes the lock again and drops the scratch schema; "
    "nothing published",
)
def test_server_restart_during_pg_dump(
    pg_server: Server, source: Source, observe: Callable[[str], None]
) -> None:
    if pg_server.cluster is None:
        pytest.skip("restarting needs a throwaway cluster, not TEST_DATABASE_URL's server")
    with harness.pg_dump_stuck(source.url) as stuck:
        job = source.start(CONNECT_ATTEMPTS="20", CONNECT_WAIT="0.1")
        stuck.wait(job)
        pg_server.restart()
    result = harness.finish(job)
    assert result.returncode == 5, result.stderr
    assert "scratch schema dropped" in result.messages()
    observe(f"exit {result.returncode}, scratch schema dropped after reconnecting")
    source.assert_clean()


@pytest.mark.fault(
    "nothing listens where DATABASE_URL points (connection refused)",
    "bounded retries, each logged, then exit 4 naming DATABASE_URL",
)
def test_connection_refused(tmp_path: Path, observe: Callable[[str], None]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"postgresql://dumper@127.0.0.1:{port}/prod"
    env = jobrun.job_env(url, tmp_path, tmp_path, CONNECT_ATTEMPTS="3", CONNECT_WAIT="0.05")
    (tmp_path / "allow_list.json").write_text('{"people": ["id"]}')
    env["ALLOW_LIST"] = str(tmp_path / "allow_list.json")
    result = jobrun.run(env, "dump")
    assert result.returncode == 4, result.stderr
    retries = [line for line in result.logs if line["message"] == "cannot connect, retrying"]
    assert [line["attempt"] for line in retries] == [1, 2]
    assert all("refused" in line["error"] for line in retries)
    message = error_of(result)
    assert "after 3 attempts" in message and "DATABASE_URL" in message
    observe(f"{len(retries)} retries logged, exit {result.returncode}")


@pytest.mark.fault(
    "statement_timeout (set on the database) cancels the copy",
    "exit 4 naming the statement timeout; the copy rolled back",
)
def test_statement_timeout(source: Source, observe: Callable[[str], None]) -> None:
    with psycopg.connect(source.url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET statement_timeout = '500ms'").format(
                sql.Identifier(conn.info.dbname)
            )
        )
    result = source.run(PGOPTIONS=SLOW)
    assert result.returncode == 4, result.stderr
    assert "statement timeout" in error_of(result)
    observe(f"exit {result.returncode}")
    source.assert_clean()


@pytest.mark.fault(
    "another session holds an exclusive lock on a listed table longer than LOCK_TIMEOUT",
    "exit 4 naming the lock timeout; nothing written",
)
def test_lock_timeout(source: Source, observe: Callable[[str], None]) -> None:
    with psycopg.connect(source.url) as migration:
        migration.execute("LOCK TABLE people IN ACCESS EXCLUSIVE MODE")
        result = source.run(LOCK_TIMEOUT="300ms")
        migration.rollback()
    assert result.returncode == 4, result.stderr
    message = error_of(result)
    assert "lock" in message and "LOCK_TIMEOUT" in message
    observe(f"exit {result.returncode}")
    source.assert_clean()
