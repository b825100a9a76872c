"""The test harness itself: if these fail, every other integration test is suspect."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import textwrap
from pathlib import Path

import psycopg
import pytest

from app.cluster import Cluster, ClusterError, pick_free_port
from tests.conftest import Server

REPO = Path(__file__).resolve().parents[2]


def test_throwaway_cluster_runs_unprivileged_with_scratch_settings(pg_server: Server) -> None:
    if pg_server.cluster is None:
        pytest.skip("TEST_DATABASE_URL's server is not ours to inspect")
    expected_user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
    owner = pwd.getpwuid(pg_server.cluster.datadir.stat().st_uid).pw_name
    assert owner == expected_user
    with psycopg.connect(pg_server.admin_url) as conn:
        settings = conn.execute(
            "SELECT current_setting('listen_addresses'), current_setting('fsync'),"
            " current_setting('data_checksums'), current_setting('wal_level')"
        ).fetchone()
    assert settings == ("127.0.0.1", "off", "off", "replica")


def test_server_major_matches_the_requested_one(pg_server: Server) -> None:
    with psycopg.connect(pg_server.admin_url) as conn:
        assert conn.info.server_version // 10000 == pg_server.major
    pg_dump = subprocess.run(
        [pg_server.bindir / "pg_dump", "--version"], capture_output=True, text=True, check=True
    )
    dump_major = int(pg_dump.stdout.split()[-1].split(".")[0])
    assert dump_major >= pg_server.major, "pg_dump refuses to dump a newer server"


def test_create_database_gives_an_empty_database(pg_server: Server) -> None:
    name = "harness_empty"
    url = pg_server.create_database(name)
    try:
        with psycopg.connect(url) as conn:
            user_relations = conn.execute(
                "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')"
            ).fetchone()
        assert user_relations == (0,)
    finally:
        pg_server.drop_database(name)
    with psycopg.connect(pg_server.admin_url) as conn:
        left = conn.execute("SELECT count(*) FROM pg_database WHERE datname = %s", [name])
        assert left.fetchone() == (0,)


def test_citext_can_be_created(source_db: str) -> None:
    with psycopg.connect(source_db) as conn:
        conn.execute("CREATE EXTENSION citext")
        assert conn.execute("SELECT 'Ada@Example.org'::citext = 'ada@example.org'").fetchone() == (
            True,
        )


def test_failed_start_shows_the_server_log(pg_server: Server) -> None:
    if pg_server.cluster is None:
        pytest.skip("needs the binaries of a throwaway cluster")
    datadir = pg_server.cluster.datadir.with_name("broken")
    cluster = Cluster(pg_server.bindir, datadir, pick_free_port())
    cluster.init(settings={"shared_buffers": "lots"})
    try:
        with pytest.raises(ClusterError, match='invalid value for parameter "shared_buffers"'):
            cluster.start()
        assert not cluster.is_running()
    finally:
        cluster.destroy()
    assert not datadir.exists()
    assert not cluster.rundir.exists()


def test_require_no_skips_fails_a_run_that_skipped(tmp_path: Path) -> None:
    (tmp_path / "test_one.py").write_text(
        textwrap.dedent(
            """
            import pytest

            def test_runs():
                pass

            def test_needs_docker():
                pytest.skip("no docker here")
            """
        )
    )
    env = {**os.environ, "REQUIRE_NO_SKIPS": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider"),
            *("--rootdir", str(tmp_path), str(tmp_path)),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == pytest.ExitCode.TESTS_FAILED, run.stdout
    assert "test_one.py::test_needs_docker: no docker here" in run.stdout
