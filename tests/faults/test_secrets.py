"""The password never shows: not in any process's argv while a run is in progress, not in a
log line, not in libpq's connection errors."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from psycopg import sql

from tests import jobrun
from tests.conftest import Server
from tests.faults import harness
from tests.faults.harness import Source, as_user
from tests.faults.test_failed_runs import error_of

REPORT_SECTION = "Secrets"


class Password:
    """A password full of characters that URIs and conninfo strings treat specially."""

    def __init__(self) -> None:
        self.marker = uuid.uuid4().hex[:16]  # what a search for a leak looks for
        self.value = f"Pa$$ w0rd/@:?#&='\\{self.marker}"

    def leaked_in(self, text: str) -> bool:
        return self.marker in text or quote(self.value, safe="") in text


@pytest.fixture
def password(pg_server: Server, source: Source, role: str) -> Iterator[Password]:
    """`role` may log in only with its password (scram-sha-256) over TCP, and may dump."""
    if pg_server.cluster is None:
        pytest.skip("needs a throwaway cluster, whose pg_hba.conf the test may change")
    secret = Password()
    ident = sql.Identifier(role)
    with psycopg.connect(source.url, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(ident, sql.Literal(secret.value)))
        conn.execute(
            sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
                sql.Identifier(conn.info.dbname), ident
            )
        )
    hba = pg_server.cluster.datadir / "pg_hba.conf"
    original = hba.read_text()
    hba.write_text(f"host all {role} 127.0.0.1/32 scram-sha-256\n{original}")
    _reload(pg_server, source, role)
    yield secret
    hba.write_text(original)
    with psycopg.connect(pg_server.admin_url, autocommit=True) as conn:
        conn.execute("SELECT pg_reload_conf()")


def _reload(pg_server: Server, source: Source, role: str) -> None:
    with psycopg.connect(pg_server.admin_url, autocommit=True) as conn:
        conn.execute("SELECT pg_reload_conf()")

    def password_required() -> bool:
        try:
            psycopg.connect(as_user(source.url, role, "wrong"), connect_timeout=5).close()
        except psycopg.OperationalError:
            return True
        return False

    harness.wait_for(password_required, "pg_hba.conf to be reloaded")


def conninfo(url: str, role: str, password: str | None) -> str:
    """`url` as a key=value conninfo string, for `role` with `password`."""
    params = {**psycopg.conninfo.conninfo_to_dict(url), "user": role}
    params.pop("password", None)
    if password is not None:
        params["password"] = password
    return psycopg.conninfo.make_conninfo(**params)


@pytest.mark.one_major
@pytest.mark.parametrize("given_as", ["URI", "conninfo", "PGPASSWORD"])
@pytest.mark.fault(
    "password given as {given_as}; argv of every process read while pg_dump runs; LOG_LEVEL=DEBUG",
    "the run succeeds with password authentication; the password is in no argv "
    "(/proc/*/cmdline) and no log line",
)
def test_password_is_in_no_argv_and_no_log(
    source: Source, role: str, password: Password, given_as: str, observe: Callable[[str], None]
) -> None:
    env = source.env(LOG_LEVEL="DEBUG")
    if given_as == "URI":
        env["DATABASE_URL"] = as_user(source.url, role, password.value)
    elif given_as == "conninfo":
        env["DATABASE_URL"] = conninfo(source.url, role, password.value)
    else:
        env["DATABASE_URL"] = as_user(source.url, role)
        env["PGPASSWORD"] = password.value
    with harness.pg_dump_stuck(source.url) as stuck:
        job = source.start(env)
        stuck.wait(job)
        (pg_dump,) = harness.children(job.pid)
        argv = harness.command_lines()
        assert "--schema=" in argv[pg_dump] and "--dbname=" in argv[pg_dump]
        assert not [pid for pid, line in argv.items() if password.leaked_in(line)]
    result = harness.finish(job)
    assert result.returncode == 0, result.stderr
    assert not password.leaked_in(result.stderr + result.stdout)
    assert any(line["level"] == "DEBUG" for line in result.logs)
    observe(f"pg_dump's and every other process's argv searched; exit {result.returncode}")


@pytest.mark.one_major
@pytest.mark.fault(
    "wrong password (in DATABASE_URL)",
    "exit 4 with libpq's 'password authentication failed'; the password in no log line",
)
def test_wrong_password_is_not_logged(
    source: Source, role: str, password: Password, observe: Callable[[str], None]
) -> None:
    wrong = Password()
    env = source.env(DATABASE_URL=as_user(source.url, role, wrong.value), LOG_LEVEL="DEBUG")
    result = jobrun.run(env, "dump")
    assert result.returncode == 4, result.stderr
    assert "password authentication failed" in error_of(result)
    assert not wrong.leaked_in(result.stderr + result.stdout)
    assert not password.leaked_in(result.stderr + result.stdout)
    observe(f"exit {result.returncode}")


def no_server_env(tmp_path: Path, url: str, **extra: str) -> dict[str, str]:
    allow = tmp_path / "allow_list.json"
    allow.write_text('{"people": ["id"]}')
    return jobrun.job_env(url, tmp_path, tmp_path, ALLOW_LIST=str(allow), **extra)


@pytest.mark.parametrize("given_as", ["URI", "conninfo"])
@pytest.mark.fault(
    "unreachable server, password given as {given_as}",
    "exit 4 after logged retries; the password in no log line",
)
def test_unreachable_server_error_has_no_password(
    tmp_path: Path, given_as: str, observe: Callable[[str], None]
) -> None:
    secret = Password()
    url = "postgresql://dumper@127.0.0.1:1/prod"
    if given_as == "URI":
        url = as_user(url, "dumper", secret.value)
    else:
        url = conninfo(url, "dumper", secret.value)
    env = no_server_env(tmp_path, url, LOG_LEVEL="DEBUG", CONNECT_ATTEMPTS="2", CONNECT_WAIT="0.05")
    result = jobrun.run(env, "dump")
    assert result.returncode == 4, result.stderr
    assert "cannot connect" in error_of(result)
    assert not secret.leaked_in(result.stderr + result.stdout)
    observe(f"exit {result.returncode}")


MALFORMED = {
    "bad %-escape in the URI password": "postgresql://dumper:{pct}%zz@127.0.0.1:1/prod",
    "unquoted space in a conninfo password": "host=127.0.0.1 port=1 password=x {raw}",
    "unterminated quote in a conninfo password": "host=127.0.0.1 port=1 password='{raw}",
    "unclosed IPv6 bracket after the password": "postgresql://dumper:{pct}@[::1/prod",
}


@pytest.mark.parametrize("case", list(MALFORMED))
@pytest.mark.fault(
    "malformed DATABASE_URL: {case}",
    "exit 2 naming DATABASE_URL, quoting none of it (libpq's parse errors quote the password)",
)
def test_malformed_database_url_is_not_quoted(
    tmp_path: Path, case: str, observe: Callable[[str], None]
) -> None:
    secret = Password()
    url = MALFORMED[case].format(pct=quote(secret.value, safe=""), raw=secret.marker)
    result = jobrun.run(no_server_env(tmp_path, url), "dump")
    assert result.returncode == 2, result.stderr
    assert "DATABASE_URL" in error_of(result)
    assert not secret.leaked_in(result.stderr + result.stdout)
    observe(f"exit {result.returncode}")
