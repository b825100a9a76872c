"""Fixtures for tests against a real PostgreSQL.

Without TEST_DATABASE_URL, each major in PG_MAJORS (default "17") gets a throwaway
cluster, started when its first test runs and destroyed before the next major starts.
With it, that server is used and PG_MAJORS is ignored.
REQUIRE_NO_SKIPS=1 (CI) turns any skipped test into a failed run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from app.cluster import Cluster, pick_free_port
from tests import pgbin

EXTERNAL_URL = os.environ.get("TEST_DATABASE_URL", "")
MAJORS = [int(m) for m in os.environ.get("PG_MAJORS", "17").split()]
REQUIRE_NO_SKIPS = os.environ.get("REQUIRE_NO_SKIPS") == "1"


@dataclass
class Server:
    """A server the tests may create and drop databases on."""

    major: int
    bindir: Path  # pg_dump, pg_restore, psql of a version that can dump this server
    admin_url: str
    cluster: Cluster | None = None  # None when the server is TEST_DATABASE_URL's

    def url(self, dbname: str) -> str:
        return _with_dbname(self.admin_url, dbname)

    def create_database(self, name: str | None = None) -> str:
        """A fresh empty database (from template0, so nothing leaks in from template1)."""
        name = name or f"test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            create = sql.SQL("CREATE DATABASE {} TEMPLATE template0")
            conn.execute(create.format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop it even if a test left a connection open."""
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                [name],
            )
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))

    def restart(self) -> None:
        if self.cluster is None:
            pytest.skip("restarting needs a throwaway cluster, not TEST_DATABASE_URL's server")
        self.cluster.restart()


def _with_dbname(url: str, dbname: str) -> str:
    if url.startswith(("postgres://", "postgresql://")):
        return urlunsplit(urlsplit(url)._replace(path="/" + quote(dbname, safe="")))
    return make_conninfo(url, dbname=dbname)


@pytest.fixture(scope="session")
def _cluster_root() -> Iterator[Path]:
    """A private parent for the clusters' data and socket dirs, short enough for a socket path."""
    root = Path(tempfile.mkdtemp(prefix="sdump-pg-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(
    scope="session",
    params=[None] if EXTERNAL_URL else MAJORS,
    ids=["external"] if EXTERNAL_URL else [f"pg{m}" for m in MAJORS],
)
def pg_server(request: pytest.FixtureRequest, _cluster_root: Path) -> Iterator[Server]:
    if EXTERNAL_URL:
        yield _external_server()
        return
    major: int = request.param
    cluster = Cluster(pgbin.bindir(major), _cluster_root / f"pg{major}", pick_free_port())
    with cluster:
        yield Server(major, cluster.bindir, cluster.url(), cluster)


def _external_server() -> Server:
    try:
        with psycopg.connect(EXTERNAL_URL, autocommit=True, connect_timeout=10) as conn:
            version = int(conn.execute("SHOW server_version_num").fetchone()[0])  # type: ignore[index]
    except psycopg.Error as exc:
        where = {k: v for k, v in conninfo_to_dict(EXTERNAL_URL).items() if k != "password"}
        pytest.exit(f"TEST_DATABASE_URL is set but its server can't be reached ({where}): {exc}")
    if os.environ.get("PG_BINDIR"):
        bindir = Path(os.environ["PG_BINDIR"])
    elif pg_dump := shutil.which("pg_dump"):
        bindir = Path(pg_dump).parent
    else:
        pytest.exit("TEST_DATABASE_URL is set: put pg_dump on PATH or set PG_BINDIR to its dir")
    return Server(version // 10000, bindir, EXTERNAL_URL)


@pytest.fixture
def source_db(pg_server: Server) -> Iterator[str]:
    """URL of a fresh empty database, dropped afterwards."""
    yield from _scratch_database(pg_server)


@pytest.fixture
def target_db(pg_server: Server) -> Iterator[str]:
    """URL of another fresh empty database, to restore into."""
    yield from _scratch_database(pg_server)


def _scratch_database(server: Server) -> Iterator[str]:
    name = f"test_{uuid.uuid4().hex[:12]}"
    url = server.create_database(name)
    yield url
    server.drop_database(name)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Whatever uses a server is an integration test, so `-m "not integration"` works.

    Tests marked `one_major` prove something the server's major does not change: they run
    on the newest major of the run only, to keep the suite short. Tests marked
    `edge_majors` are too slow for every major: they run on the oldest and the newest."""
    newest = None if EXTERNAL_URL else max(MAJORS)
    edges = (None,) if EXTERNAL_URL else (min(MAJORS), max(MAJORS))
    keep, drop = [], []
    for item in items:
        if "pg_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)
            callspec = getattr(item, "callspec", None)
            major = callspec.params.get("pg_server") if callspec else None
            if EXTERNAL_URL and item.get_closest_marker("throwaway_clusters"):
                item.add_marker(
                    pytest.mark.skip(
                        reason="starts clusters of its own; not with TEST_DATABASE_URL"
                    )
                )
            if item.get_closest_marker("one_major") and major != newest:
                drop.append(item)
                continue
            if item.get_closest_marker("edge_majors") and major not in edges:
                drop.append(item)
                continue
        keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


# REQUIRE_NO_SKIPS: CI must not go green while tests quietly skip (a missing binary,
# Docker, or server). Container tests get no exemption.
_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append(f"{report.nodeid}: {_skip_reason(report)}")


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.skipped:
        _skipped.append(f"{report.nodeid} (whole module): {_skip_reason(report)}")


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    reason = str(longrepr[2]) if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if REQUIRE_NO_SKIPS and _skipped and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if REQUIRE_NO_SKIPS and _skipped:
        terminalreporter.write_sep("=", f"REQUIRE_NO_SKIPS=1: {len(_skipped)} skipped", red=True)
        for line in _skipped:
            terminalreporter.write_line(f"SKIPPED {line}")
