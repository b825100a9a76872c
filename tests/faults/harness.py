"""What the fault tests share: a small source database, a storage folder holding a previously
published dump, and ways to catch the job in the middle of its copy or of its pg_dump."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
from psycopg.conninfo import conninfo_to_dict

from tests import jobrun
from tests.conftest import Server
from tests.jobrun import SCRATCH

APP_NAME = "sanitised-dump"
DUMP = "sanitised.dump"
ROWS = 2000
# Every row copied into the scratch table sleeps `test.delay` seconds when the job's
# sessions set it (PGOPTIONS="-c test.delay=0.01"), and not at all otherwise: the CHECK is
# recreated on the scratch copy, so one run can be slowed down and the next one not.
SOURCE_SQL = f"""
CREATE TABLE people (
    id integer PRIMARY KEY,
    name text NOT NULL,
    email text UNIQUE,
    note text,
    CONSTRAINT slow CHECK (
        length(pg_sleep(current_setting('test.delay', true)::float8)::text) = 0)
);
INSERT INTO people
SELECT i, 'canary name ' || i, 'canary' || i || '@example.org',
       CASE WHEN i % 5 <> 0 THEN 'canary note ' || i END
FROM generate_series(1, {ROWS}) AS i;
CREATE TABLE payroll (id integer PRIMARY KEY, salary_note text NOT NULL);
INSERT INTO payroll VALUES (1, 'canary payroll');
"""
ALLOW = {"people": ["id"]}
SLOW = "-c test.delay=0.01"  # PGOPTIONS for a copy of 2000 rows that takes 20 s


@dataclass
class Source:
    """A source database with the job's settings, and the dump published by an earlier run."""

    server: Server
    url: str
    storage: Path
    allow_list: Path
    previous: bytes
    started: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def dump(self) -> Path:
        return self.storage / DUMP

    def env(self, **extra: str) -> dict[str, str]:
        return jobrun.job_env(
            self.url, self.storage, self.server.bindir, ALLOW_LIST=str(self.allow_list), **extra
        )

    def write_allow(self, document: Any) -> None:
        self.allow_list.write_text(json.dumps(document), encoding="utf-8")

    def run(self, *args: str, **extra: str) -> jobrun.Result:
        return jobrun.run(self.env(**extra), *(args or ("dump",)))

    def start(self, env: dict[str, str] | None = None, **extra: str) -> subprocess.Popen[str]:
        process = jobrun.start(env or self.env(**extra), "dump")
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        """A test that failed half-way leaves no job running into the next test."""
        for process in self.started:
            if process.poll() is None:
                process.kill()
            for stream in (process.stdout, process.stderr):
                if stream is not None and not stream.closed:
                    stream.close()
            process.wait()

    def execute(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def assert_clean(self) -> None:
        """What a failed run must leave: no scratch schema, no temp file, the previous dump
        byte-identical, and no session of the job still connected."""
        assert SCRATCH not in jobrun.schemas(self.url)
        assert jobrun.temp_files(self.storage) == []
        assert self.dump.read_bytes() == self.previous
        wait_for(lambda: not job_sessions(self.url), "the job's sessions to end")


def make_source(server: Server, url: str, storage: Path, allow_list: Path) -> Source:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SOURCE_SQL)
    previous = b"PGDMP a dump published by an earlier run\n" + os.urandom(256)
    (storage / DUMP).write_bytes(previous)
    os.chmod(storage / DUMP, 0o600)
    source = Source(server, url, storage, allow_list, previous)
    source.write_allow(ALLOW)
    return source


def as_user(url: str, user: str, password: str | None = None) -> str:
    """A URI to the database of `url` (a URI or conninfo) as another user, URI-encoded."""
    params = conninfo_to_dict(url)
    auth = quote(user, safe="") + (f":{quote(password, safe='')}" if password else "")
    host = str(params.get("host") or params.get("hostaddr") or "localhost")
    where = f"[{host}]" if ":" in host else quote(host, safe="/")
    port = params.get("port") or "5432"
    return f"postgresql://{auth}@{where}:{port}/{quote(str(params.get('dbname', '')), safe='')}"


def wait_for(
    predicate: Callable[[], object],
    what: str,
    timeout: float = 60,
    process: subprocess.Popen[str] | None = None,
) -> None:
    """Poll until `predicate` holds; fail naming `what` (and the job's output if it died)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if process is not None and process.poll() is not None:
            _, err = process.communicate()
            raise AssertionError(f"the job exited {process.returncode} before {what}:\n{err}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def job_sessions(url: str) -> list[tuple[Any, ...]]:
    """Sessions of the job (and of its pg_dump) on the source database."""
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(
            "SELECT pid, state, left(query, 60) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = %s",
            [APP_NAME],
        ).fetchall()


def copy_running(url: str) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = %s AND state = 'active' AND query LIKE 'INSERT INTO%%'",
            [APP_NAME],
        ).fetchone()
    return bool(row and row[0])


def finish(process: subprocess.Popen[str], timeout: float = 120) -> jobrun.Result:
    """Wait for the job to end; a job that hangs is killed and its log shown."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"the job did not end within {timeout} s:\n{err}") from None
    return jobrun.Result(process.returncode, err, out)


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (from /proc), e.g. the job's pg_dump."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def command_lines() -> dict[int, str]:
    """Every process's argv, as `ps` would show it to any user of the machine."""
    lines = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                lines[int(entry.name)] = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
    return lines


class PgDumpStuck:
    """Holds a lock that pg_dump needs and the job never takes, so the job's pg_dump stays
    in progress (its tables already locked, reading security labels) until `release()`: a
    pg_dump caught half-way. The catalog has no syscache, so new sessions, which may read
    every cached catalog while they start, are not held up by the lock."""

    CATALOG = "pg_catalog.pg_largeobject_metadata"

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn = psycopg.connect(url)
        self.conn.execute("SET lock_timeout = '30s'")
        self.conn.execute(f"LOCK TABLE {self.CATALOG} IN ACCESS EXCLUSIVE MODE")

    def backends(self) -> set[int]:
        """Server sessions of the job's pg_dump that wait on the lock."""
        with psycopg.connect(self.url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name = %s AND wait_event_type = 'Lock'"
                " AND query LIKE '%%pg_seclabels%%'",
                [APP_NAME],
            ).fetchall()
        return {int(pid) for (pid,) in rows}

    def wait(self, process: subprocess.Popen[str], known: set[int] | None = None) -> int:
        """The pid of the server session of a new pg_dump, once it waits on the lock."""
        known = known or set()
        wait_for(lambda: self.backends() - known, "pg_dump to start", process=process)
        return min(self.backends() - known)

    def release(self) -> None:
        if not self.conn.closed:
            with contextlib.suppress(psycopg.OperationalError):  # the server restarted
                self.conn.rollback()
            self.conn.close()


@contextmanager
def pg_dump_stuck(url: str) -> Iterator[PgDumpStuck]:
    stuck = PgDumpStuck(url)
    try:
        yield stuck
    finally:
        stuck.release()


def interrupt(process: subprocess.Popen[str], signum: int) -> None:
    process.send_signal(signum)
    if signum == signal.SIGKILL:
        process.communicate(timeout=30)  # reaps it and closes its pipes
