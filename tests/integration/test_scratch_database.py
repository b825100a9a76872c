"""SCRATCH_DATABASE_URL: the source is a hot standby, read only; the copy is made in another
database (a URL) or in a server the job starts (`embedded`), under the original names."""

from __future__ import annotations

import fcntl
import json
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from app import allowlist, catalog, db, plan, scratchdb
from app import config as configuration
from app.errors import DatabaseError
from tests import jobrun, pgbin, replica
from tests.conftest import Server
from tests.seed import demo
from tests.seed.jobserver import data as jobserver

# A primary, its standby and two embedded servers per major take about a minute; the
# core guarantees run on every major, the one_major tests (refusals, locks, conflicts with
# a slow copy) on one.
pytestmark = [pytest.mark.throwaway_clusters]

# Every relation and schema of a database, to prove the run created none on the source.
RELATIONS = "SELECT oid, relname, relfilenode FROM pg_class ORDER BY oid"
NAMESPACES = "SELECT oid, nspname FROM pg_namespace ORDER BY oid"
CONSTRAINTS = """
SELECT n.nspname, c.relname, con.conname, con.contype, pg_get_constraintdef(con.oid)
FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname IN ('public', 'billing') AND c.relname <> 'api_sessions' AND con.contype <> 'n'
ORDER BY 1, 2, 3
"""
INDEXES = """
SELECT schemaname, tablename, indexname, indexdef FROM pg_indexes
WHERE schemaname IN ('public', 'billing') AND tablename <> 'api_sessions' ORDER BY 1, 2, 3
"""
# Two tables whose every row carries the same version in any one snapshot; the CHECK
# sleeps in the copy (any database but the source's), so that the copy takes seconds.
SLOW = """
CREATE TABLE slow (id int PRIMARY KEY, version int NOT NULL, payload text NOT NULL,
    CONSTRAINT slow_copy CHECK (length(pg_sleep(CASE WHEN current_database() = 'slow' THEN 0
                                                    ELSE 0.003 END)::text) = 0));
CREATE TABLE slow_child (id int PRIMARY KEY, slow_id int NOT NULL REFERENCES slow (id),
    version int NOT NULL);
INSERT INTO slow SELECT i, 1, repeat(md5(i::text), 32) FROM generate_series(1, 500) AS i;
INSERT INTO slow_child SELECT i, i, 1 FROM generate_series(1, 500) AS i;
"""
SLOW_ALLOW = {"slow": ["id", "version", "payload"], "slow_child": ["id", "slow_id", "version"]}
USER_RELATIONS = """
SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
"""


@dataclass
class Source:
    """The demo and job-server databases on a primary, read through its hot standby."""

    server: Server
    pair: replica.Pair
    bindir: Path
    root: Path  # private, traversable by the servers' user (unlike pytest's tmp dirs)

    def storage(self, name: str) -> Path:
        """A fresh STORAGE_DIR; the embedded server's user can reach into it."""
        return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.root))

    def primary(self, db: str = "postgres") -> str:
        return self.pair.primary.url(db)

    def standby(self, db: str = "postgres") -> str:
        return self.pair.standby.url(db)

    def create_database(self, prefix: str) -> str:
        """An empty database on the primary (where restores and scratch copies go)."""
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(self.primary(), autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name))
            )
        return name


@pytest.fixture(scope="module")
def source(pg_server: Server, _cluster_root: Path) -> Iterator[Source]:
    bindir = pgbin.bindir(pg_server.major)
    root = Path(tempfile.mkdtemp(prefix=f"pair{pg_server.major}-", dir=_cluster_root))
    with replica.pair(bindir, root) as pair:
        with psycopg.connect(pair.primary.url(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE demo TEMPLATE template0")
            conn.execute("CREATE DATABASE jobs TEMPLATE template0")
            conn.execute("CREATE DATABASE slow TEMPLATE template0")
        with psycopg.connect(pair.primary.url("demo")) as conn:
            demo.load(conn)
        with psycopg.connect(pair.primary.url("jobs")) as conn:
            jobserver.load(conn)
        with psycopg.connect(pair.primary.url("slow")) as conn:
            conn.execute(SLOW)
        pair.sync()
        yield Source(pg_server, pair, bindir, root)
    shutil.rmtree(root, ignore_errors=True)


def job_env(source: Source, storage: Path, db: str, scratch: str, **extra: str) -> dict[str, str]:
    return jobrun.job_env(
        source.standby(db), storage, source.bindir, SCRATCH_DATABASE_URL=scratch, **extra
    )


def catalog_of(url: str) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    return jobrun.rows(url, RELATIONS), jobrun.rows(url, NAMESPACES)


@dataclass
class Dumped:
    source: Source
    mode: str
    storage: Path
    scratch: str | None  # the scratch database's name in URL mode
    target: str  # URL of the database the dump was restored into
    result: jobrun.Result
    script: str
    catalog_before: tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]


@pytest.fixture(scope="module", params=["database", "embedded"])
def dumped(request: pytest.FixtureRequest, source: Source) -> Dumped:
    mode: str = request.param
    storage = source.storage(f"storage-{mode}")
    scratch = source.create_database("scratch") if mode == "database" else None
    before = catalog_of(source.standby("demo"))
    env = job_env(source, storage, "demo", source.primary(scratch) if scratch else "embedded")
    result = jobrun.run(env, "dump")
    assert result.returncode == 0, result.stderr
    target = source.primary(source.create_database("restored"))
    restored = jobrun.restore(source.bindir, storage / "sanitised.dump", target)
    assert restored.returncode == 0, restored.stderr
    assert restored.stderr == ""
    script = jobrun.restore_script(source.bindir, storage / "sanitised.dump")
    return Dumped(source, mode, storage, scratch, target, result, script, before)


def _split(key: str) -> tuple[str, str]:
    schema, dot, table = key.partition(".")
    return (schema, table) if dot else ("public", key)


def test_the_dump_restores_under_the_original_names(dumped: Dumped) -> None:
    tables = jobrun.rows(
        dumped.target,
        "SELECT table_schema, table_name FROM information_schema.tables"
        " WHERE table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2",
    )
    manifest = ("sanitised_dump", "manifest")  # in a schema of its own
    assert tables == sorted([*(_split(k) for k in demo.allow_list()), manifest])
    assert jobrun.SCRATCH not in jobrun.schemas(dumped.target)
    # The copy's tables were UNLOGGED; the dump restores ordinary ones.
    persistence = jobrun.rows(
        dumped.target,
        "SELECT DISTINCT c.relpersistence FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname IN ('public', 'billing') AND c.relkind IN ('r', 'i', 'S')",
    )
    assert persistence == [("p",)]


def test_inspect_and_restore_read_the_manifest(dumped: Dumped) -> None:
    dump = dumped.storage / "sanitised.dump"
    env = job_env(dumped.source, dumped.storage, "demo", "embedded")
    inspected = jobrun.run(env, "inspect", "--format", "json", str(dump))
    assert inspected.returncode == 0, inspected.stderr
    manifest = json.loads(inspected.stdout)["manifest"]
    assert (
        manifest["mode"]
        == {"database": "scratch_database", "embedded": "embedded_server"}[dumped.mode]
    )
    assert manifest["scratch_schema"] is None
    assert {(t["schema"], t["name"]) for t in manifest["tables"]} == {
        (t["scratch_schema"], t["scratch_name"]) for t in manifest["tables"]
    }
    assert sum(t["rows"] for t in manifest["tables"]) == 1760
    target = dumped.source.primary(dumped.source.create_database("restored"))
    restored = jobrun.run(env, "restore", "--dump", str(dump), "--target", target)
    assert restored.returncode == 0, restored.stderr
    query = "SELECT id, org_id, role FROM users ORDER BY id"
    assert jobrun.rows(target, query) == jobrun.rows(dumped.target, query)


def test_no_canary_and_no_unlisted_row_is_in_the_dump(dumped: Dumped) -> None:
    assert demo.CANARY not in dumped.script.lower()
    assert "api_sessions" not in dumped.script
    # ... and the search would find one if it were there: the source is full of them.
    assert jobrun.rows(
        dumped.source.standby("demo"), "SELECT count(*) FROM users WHERE email LIKE '%canary%'"
    ) == [(400,)]


@pytest.mark.parametrize("key", list(demo.allow_list()))
def test_row_counts_and_kept_columns_are_identical(dumped: Dumped, key: str) -> None:
    schema, table = _split(key)
    columns = sql.SQL(", ").join(sql.Identifier(c) for c in demo.allow_list()[key])
    query = sql.SQL("SELECT {cols} FROM {t} ORDER BY {cols}").format(
        cols=columns, t=sql.Identifier(schema, table)
    )
    source = jobrun.rows(dumped.source.standby("demo"), query)
    assert len(source) == demo.TABLES[f"{schema}.{table}"]
    assert jobrun.rows(dumped.target, query) == source


def test_faked_columns_differ_from_the_source_and_keep_nulls(dumped: Dumped) -> None:
    query = "SELECT id, email::text, phone, signup_ip::text FROM users ORDER BY id"
    source = jobrun.rows(dumped.source.standby("demo"), query)
    target = jobrun.rows(dumped.target, query)
    assert [r[0] for r in source] == [r[0] for r in target]
    for (_, *original), (_, *fake) in zip(source, target, strict=True):
        for before, after in zip(original, fake, strict=True):
            assert (before is None) == (after is None)
            assert before is None or before != after


def test_constraints_indexes_and_foreign_keys_are_those_of_the_source(dumped: Dumped) -> None:
    source = dumped.source.standby("demo")
    assert jobrun.rows(dumped.target, CONSTRAINTS) == jobrun.rows(source, CONSTRAINTS)
    assert jobrun.rows(dumped.target, INDEXES) == jobrun.rows(source, INDEXES)
    fks = [r for r in jobrun.rows(dumped.target, CONSTRAINTS) if r[3] == "f"]
    assert ("public", "audit_events", "audit_events_user_id_fkey") in [r[:3] for r in fks]


def test_sequences_continue_after_the_copied_rows(dumped: Dumped) -> None:
    with psycopg.connect(dumped.target) as conn:
        org = conn.execute(
            "INSERT INTO orgs (name, slug) VALUES ('new org', 'new-org') RETURNING id"
        ).fetchone()[0]  # type: ignore[index]
        user = conn.execute(
            "INSERT INTO users (org_id, email, full_name, password_hash, signup_ip, external_id)"
            " VALUES (%s, 'new@example.org', 'New', 'x', '127.0.0.1', gen_random_uuid())"
            " RETURNING id",
            [org],
        ).fetchone()[0]  # type: ignore[index]
        event = conn.execute(
            "INSERT INTO audit_events (user_id, action) VALUES (%s, 'login') RETURNING id", [user]
        ).fetchone()[0]  # type: ignore[index]
    assert org == demo.TABLES["public.orgs"] + 1
    assert user == demo.TABLES["public.users"] + 1
    assert event == demo.TABLES["public.audit_events"] + 1


def test_the_source_is_untouched_and_the_scratch_left_empty(dumped: Dumped) -> None:
    assert catalog_of(dumped.source.standby("demo")) == dumped.catalog_before
    if dumped.scratch is not None:
        assert jobrun.rows(dumped.source.primary(dumped.scratch), USER_RELATIONS) == [(0,)]
    # Only the dump (and the embedded mode's lock file) stays in the storage folder.
    names = sorted(p.name for p in dumped.storage.iterdir())
    expected = ["sanitised.dump"]
    if dumped.mode == "embedded":
        expected.insert(0, ".sanitised-dump-sanitised.dump.lock")
    assert names == expected


def test_logs_carry_the_mode(dumped: Dumped) -> None:
    logs = dumped.result.logs
    assert {line["mode"] for line in logs} == {dumped.mode}
    assert (logs[0]["message"], logs[-1]["message"]) == ("run started", "run finished")
    stages = logs[-1]["stage_seconds"]
    assert {"setup", "prepare", "copy", "indexes", "foreign_keys", "pg_dump"} <= set(stages)
    assert min(stages.values()) >= 0
    assert [line["rows"] for line in logs if line["message"] == "table copied"] == [
        demo.TABLES[".".join(_split(k))] for k in demo.allow_list()
    ]


# -- the job-server schema --------------------------------------------------------------

FK_QUERY = "SELECT count(*) FROM pg_constraint WHERE contype = 'f'"


def test_jobserver_dump_restores_under_the_original_names(source: Source) -> None:
    storage = source.storage("jobs")
    scratch = source.create_database("scratch")
    env = job_env(
        source, storage, "jobs", source.primary(scratch), ALLOW_LIST=str(jobserver.ALLOW_LIST)
    )
    result = jobrun.run(env, "dump")
    assert result.returncode == 0, result.stderr
    target = source.primary(source.create_database("restored"))
    dump = storage / "sanitised.dump"
    restored = jobrun.restore(source.bindir, dump, target)
    assert restored.returncode == 0, restored.stderr
    assert jobserver.CANARY not in jobrun.restore_script(source.bindir, dump).lower()

    copied = [line for line in result.logs if line["message"] == "table copied"]
    assert len(copied) == jobserver.TABLE_COUNT
    counts = jobrun.rows(
        target,
        "SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace"
        " AND relkind = 'r'",
    )
    assert counts == [(jobserver.TABLE_COUNT,)]
    user = "SELECT id, username, fullname, last_login FROM jobserver_user ORDER BY id"
    assert jobrun.rows(target, user) == jobrun.rows(source.standby("jobs"), user)
    left_out = [line for line in result.logs if line["message"] == "foreign key left out"]
    source_fks = jobrun.rows(source.standby("jobs"), FK_QUERY)[0][0]
    assert jobrun.rows(target, FK_QUERY)[0][0] == source_fks - len(left_out) >= 100


@pytest.mark.one_major
def test_set_values_and_structure_only_tables_in_a_scratch_database(
    source: Source, tmp_path: Path
) -> None:
    allow = tmp_path / "allow.json"
    allow.write_text(
        json.dumps(
            {
                "orgs": {
                    "keep": ["id", "name", "slug", "seats", "created_at"],
                    "set": {"website": "https://example.invalid/{n}"},
                },
                "api_sessions": {"rows": "none"},
            }
        ),
        encoding="utf-8",
    )
    storage = source.storage("set")
    scratch = source.primary(source.create_database("scratch"))
    result = jobrun.run(job_env(source, storage, "demo", scratch, ALLOW_LIST=str(allow)), "dump")
    assert result.returncode == 0, result.stderr
    target = source.primary(source.create_database("restored"))
    restored = jobrun.restore(source.bindir, storage / "sanitised.dump", target)
    assert restored.returncode == 0, restored.stderr
    websites = jobrun.rows(
        target, "SELECT DISTINCT left(website, 24) FROM orgs WHERE website IS NOT NULL"
    )
    assert websites == [("https://example.invalid/",)]
    assert jobrun.rows(target, "SELECT count(*) FROM api_sessions") == [(0,)]
    assert "canary" not in jobrun.restore_script(source.bindir, storage / "sanitised.dump")

    allow.write_text(json.dumps({"users": {"keep": ["id"], "pseudonymise": ["email"]}}))
    refused = jobrun.run(
        job_env(source, storage, "demo", scratch, ALLOW_LIST=str(allow), PSEUDONYM_KEY="k" * 32),
        "dump",
    )
    assert refused.returncode == 2, refused.stderr
    assert "pseudonymises columns" in refused.logs[-1]["message"]
    assert refused.logs[-1]["mode"] == "database"  # failures say which mode failed
    assert jobrun.rows(scratch, USER_RELATIONS) == [(0,)]


# -- what the job refuses ---------------------------------------------------------------


def _marked(url: str) -> bool:
    comment = jobrun.rows(
        url,
        "SELECT shobj_description(oid, 'pg_database') FROM pg_database"
        " WHERE datname = current_database()",
    )[0][0]
    return comment is not None and comment.startswith("sanitised-dump")


@pytest.mark.one_major
def test_refuses_the_source_itself_or_the_same_database_on_its_primary(
    source: Source, tmp_path: Path
) -> None:
    before = jobrun.rows(source.primary("demo"), USER_RELATIONS)
    for scratch in (source.standby("demo"), source.primary("demo")):
        result = jobrun.run(job_env(source, tmp_path, "demo", scratch), "dump")
        assert result.returncode == 2, result.stderr
        assert "points at the source database 'demo'" in result.messages()
        assert not _marked(source.primary("demo"))
    assert jobrun.rows(source.primary("demo"), USER_RELATIONS) == before
    assert list(tmp_path.iterdir()) == []


@pytest.mark.one_major
def test_the_default_mode_on_a_standby_says_to_set_scratch_database_url(
    source: Source, tmp_path: Path
) -> None:
    env = jobrun.job_env(source.standby("demo"), tmp_path, source.bindir)
    result = jobrun.run(env, "dump")
    assert result.returncode == 4, result.stderr
    assert "set SCRATCH_DATABASE_URL" in result.logs[-1]["message"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.one_major
def test_refuses_a_database_that_is_not_empty_and_not_its_own(
    source: Source, tmp_path: Path
) -> None:
    scratch = source.primary(source.create_database("someones"))
    with psycopg.connect(scratch) as conn:
        conn.execute("CREATE TABLE precious (id int); INSERT INTO precious VALUES (1)")
    result = jobrun.run(job_env(source, tmp_path, "demo", scratch), "dump")
    assert result.returncode == 2, result.stderr
    assert "is not empty (relation precious)" in result.messages()
    assert jobrun.rows(scratch, "SELECT id FROM precious") == [(1,)]
    assert not _marked(scratch)


@pytest.mark.one_major
def test_empties_what_a_killed_run_left_in_its_own_database(source: Source, tmp_path: Path) -> None:
    scratch = source.primary(source.create_database("leftover"))
    ok = jobrun.run(job_env(source, tmp_path, "demo", scratch), "dump")
    assert ok.returncode == 0, ok.stderr
    assert _marked(scratch)
    with psycopg.connect(scratch) as conn:  # what a killed run would have left
        conn.execute("CREATE SCHEMA billing; CREATE TABLE billing.invoices (id int)")
        conn.execute("CREATE TABLE public.orgs (id int)")
    again = jobrun.run(job_env(source, tmp_path, "demo", scratch), "dump")
    assert again.returncode == 0, again.stderr
    assert jobrun.rows(scratch, USER_RELATIONS) == [(0,)]


@pytest.mark.one_major
def test_a_second_run_on_the_same_scratch_exits_7_and_touches_nothing(
    source: Source, tmp_path: Path
) -> None:
    scratch = source.primary(source.create_database("busy"))
    with psycopg.connect(scratch, autocommit=True) as conn:
        conn.execute(
            sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                sql.Identifier(conn.info.dbname), sql.Literal(scratchdb.MARKER)
            )
        )
        conn.execute("CREATE TABLE in_use (id int)")  # the running job's copy
        conn.execute("SELECT pg_advisory_lock(%s)", [db.lock_key(scratchdb.LOCK_SCOPE)])
        result = jobrun.run(job_env(source, tmp_path, "demo", scratch), "dump")
        assert result.returncode == 7, result.stderr
        assert jobrun.rows(scratch, "SELECT count(*) FROM in_use") == [(0,)]

    storage = source.storage("busy")
    lock = storage / ".sanitised-dump-sanitised.dump.lock"
    with lock.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        result = jobrun.run(job_env(source, storage, "demo", "embedded"), "dump")
    assert result.returncode == 7, result.stderr
    assert "DUMP_NAME=sanitised.dump" in result.messages()
    assert sorted(p.name for p in storage.iterdir()) == [lock.name]


# -- the embedded server goes away whatever happens -----------------------------------------


class Watched:
    """A job run whose log lines are read as they come."""

    def __init__(self, env: dict[str, str]) -> None:
        self.process = jobrun.start(env, "dump")
        self.lines: list[dict[str, Any]] = []
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            if line.startswith("{"):
                with self.changed:
                    self.lines.append(json.loads(line))
                    self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def wait_for(self, message: str, timeout: float = 60) -> bool:
        """True once a log line starts with `message`; False if the job ended first."""
        with self.changed:
            return self.changed.wait_for(
                lambda: (
                    any(m["message"].startswith(message) for m in self.lines)
                    or not self.reader.is_alive()
                ),
                timeout,
            ) and any(m["message"].startswith(message) for m in self.lines)

    def finish(self, timeout: float = 120) -> int:
        code = self.process.wait(timeout)
        self.reader.join(timeout)
        return code

    def __enter__(self) -> Watched:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.finish()
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()

    def messages(self) -> str:
        return "\n".join(m["message"] for m in self.lines)


def _servers_on(path: Path) -> list[str]:
    """Processes whose command line names `path` (a postmaster left running there)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(path) in cmdline:
            found.append(cmdline)
    return found


def _slow_env(source: Source, storage: Path, scratch: str) -> dict[str, str]:
    allow = storage.parent / f"{storage.name}-allow.json"
    allow.write_text(json.dumps(SLOW_ALLOW), encoding="utf-8")
    return job_env(source, storage, "slow", scratch, ALLOW_LIST=str(allow))


@pytest.mark.one_major
def test_sigterm_stops_and_removes_the_embedded_server(source: Source) -> None:
    storage = source.storage("sigterm")
    with Watched(_slow_env(source, storage, "embedded")) as run:
        assert run.wait_for("scratch database ready"), run.messages()
        time.sleep(0.5)  # into the copy
        run.process.send_signal(signal.SIGTERM)
        assert run.finish() == 128 + signal.SIGTERM, run.messages()
    assert "embedded server removed" in run.messages()
    assert sorted(p.name for p in storage.iterdir()) == [".sanitised-dump-sanitised.dump.lock"]
    assert _servers_on(storage) == []


@pytest.mark.one_major
def test_the_next_run_removes_what_a_killed_run_left(source: Source) -> None:
    storage = source.storage("sigkill")
    with Watched(_slow_env(source, storage, "embedded")) as run:
        assert run.wait_for("scratch database ready"), run.messages()
        run.process.kill()
    assert _servers_on(storage) != []  # the orphaned server is still running
    again = jobrun.run(job_env(source, storage, "demo", "embedded"), "dump")
    assert again.returncode == 0, again.stderr
    assert "removing a leftover embedded server" in again.messages()
    assert _servers_on(storage) == []
    assert sorted(p.name for p in storage.iterdir()) == [
        ".sanitised-dump-sanitised.dump.lock",
        "sanitised.dump",
    ]


# -- a hot standby cancels the copy to replay the primary's changes ----------------------------


class Conflicts:
    """Keeps changing every row of both slow tables on the primary, in one transaction each
    time, and vacuuming them: each vacuum removes rows the standby's snapshot still sees."""

    def __init__(self, source: Source) -> None:
        self.url = source.primary("slow")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Conflicts:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)

    def _run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.stop.is_set():
                with conn.transaction():
                    conn.execute("UPDATE slow SET version = version + 1")
                    conn.execute("UPDATE slow_child SET version = version + 1")
                conn.execute("VACUUM slow, slow_child")
                self.stop.wait(0.2)


@pytest.fixture
def impatient_standby(source: Source) -> Iterator[None]:
    """A standby that cancels conflicting queries at once, as an unprepared one would."""
    source.pair.set_standby(max_standby_streaming_delay="0")
    yield
    source.pair.set_standby(max_standby_streaming_delay="30s")


def test_a_cancelled_copy_starts_again_from_a_fresh_snapshot(
    source: Source, impatient_standby: None
) -> None:
    storage = source.storage("conflict")
    scratch = source.create_database("scratch")
    with Watched(_slow_env(source, storage, source.primary(scratch))) as run:
        with Conflicts(source):
            assert run.wait_for("the standby cancelled the copy"), run.messages()
        # From now on the standby waits for the copy instead of cancelling it, so WAL that
        # the conflicts left to replay cannot cancel the retry too.
        source.pair.set_standby(max_standby_streaming_delay="-1")
        assert run.finish() == 0, run.messages()

    target = source.primary(source.create_database("restored"))
    restored = jobrun.restore(source.bindir, storage / "sanitised.dump", target)
    assert restored.returncode == 0, restored.stderr
    # One snapshot for both tables: every row carries the same version.
    versions = jobrun.rows(
        target, "SELECT DISTINCT version FROM slow UNION SELECT DISTINCT version FROM slow_child"
    )
    assert len(versions) == 1 and versions[0][0] > 1
    assert jobrun.rows(target, "SELECT count(*) FROM slow_child") == [(500,)]


def test_a_copy_cancelled_every_time_says_what_to_set(
    source: Source, impatient_standby: None
) -> None:
    storage = source.storage("conflicts")
    scratch = source.create_database("scratch")
    with Conflicts(source):
        result = jobrun.run(_slow_env(source, storage, source.primary(scratch)), "dump")
    assert result.returncode == 4, result.stderr
    message = result.logs[-1]["message"]
    assert "hot_standby_feedback" in message and "max_standby_streaming_delay" in message
    warnings = [m for m in result.logs if m["message"].startswith("the standby cancelled the copy")]
    assert len(warnings) == 2
    assert jobrun.rows(source.primary(scratch), USER_RELATIONS) == [(0,)]
    assert sorted(storage.iterdir()) == []


def _read_on_the_standby(conn: psycopg.Connection[Any], cancelled: int) -> Any:
    """A read whose first `cancelled` calls hold a snapshot until the standby cancels them
    (the primary's vacuum removes rows it may see), the next ones quick."""
    calls: list[int] = []

    def read() -> tuple[int, int]:
        calls.append(len(calls) + 1)
        if len(calls) <= cancelled:
            conn.execute("SELECT pg_sleep(30)")
        row = conn.execute("SELECT count(*) FROM slow").fetchone()
        assert row is not None
        return len(calls), row[0]

    return read


def test_a_short_read_the_standby_cancels_is_read_again(
    source: Source, impatient_standby: None
) -> None:
    """Any query on a standby that cancels at once may be hit, however short: the job's
    reads before and around the copy (session set-up, lock, identity) are read again."""
    with psycopg.connect(source.standby("slow")) as conn, Conflicts(source):
        calls, rows = db.read_through_conflicts(conn, _read_on_the_standby(conn, cancelled=2))
    assert calls >= 3 and rows == 500


def test_a_short_read_cancelled_every_time_says_what_to_set(
    source: Source, impatient_standby: None
) -> None:
    with psycopg.connect(source.standby("slow"), autocommit=True) as conn, Conflicts(source):
        read = _read_on_the_standby(conn, cancelled=db.SHORT_READ_ATTEMPTS)
        with pytest.raises(DatabaseError) as raised:
            db.read_through_conflicts(conn, read)
    message = str(raised.value)
    assert f"{db.SHORT_READ_ATTEMPTS} times" in message
    assert "hot_standby_feedback" in message and "max_standby_streaming_delay" in message


def test_an_error_other_than_a_conflict_is_not_read_again(source: Source) -> None:
    calls: list[int] = []

    def read() -> None:
        calls.append(1)
        conn.execute("SELECT * FROM no_such_table")

    with (
        psycopg.connect(source.standby("slow")) as conn,
        pytest.raises(psycopg.errors.UndefinedTable),
    ):
        db.read_through_conflicts(conn, read)
    assert calls == [1]


# -- no writes on the source, measured in its WAL --------------------------------------------


def _wal_bytes(source: Source, start: str, end: str, db_oids: list[int]) -> list[int]:
    """Bytes of WAL records between two LSNs that touch each database."""
    if start == end:
        return [0] * len(db_oids)
    out = subprocess.run(
        [
            str(source.bindir / "pg_waldump"),
            *("-p", str(source.pair.primary.datadir / "pg_wal"), "-s", start, "-e", end),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    totals = [0] * len(db_oids)
    for line in out.splitlines():
        size = re.search(r"len \(rec/tot\):\s*\d+/\s*(\d+)", line)
        if not size:
            continue
        for i, oid in enumerate(db_oids):
            if re.search(rf"rel \d+/{oid}/\d+|\bdb {oid}\b", line):
                totals[i] += int(size.group(1))

    return totals


def _lsn(url: str) -> str:
    """The end of the WAL inserted so far, written out by a commit that writes WAL (in the
    postgres database; a checkpoint would recycle the segments pg_waldump reads)."""
    with psycopg.connect(url, autocommit=True) as conn:
        lsn = str(conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0])  # type: ignore[index]
        conn.execute("CREATE TEMP TABLE wal_written ()")
        return lsn


def test_a_run_writes_nothing_to_the_source_beyond_what_reads_do(
    source: Source, tmp_path: Path
) -> None:
    primary = source.primary()
    scratch = source.create_database("scratch")
    oids = dict(jobrun.rows(primary, "SELECT datname, oid FROM pg_database"))
    with psycopg.connect(primary, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET autovacuum = off")
        conn.execute("ALTER SYSTEM SET wal_keep_size = '1GB'")  # no segment recycled meanwhile
        conn.execute("SELECT pg_reload_conf()")
    try:
        with psycopg.connect(source.primary("demo"), autocommit=True) as conn:
            conn.execute("VACUUM")
            start = _lsn(primary)
            for key in demo.allow_list():
                conn.execute(
                    sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(*_split(key)))
                )
        reads = _wal_bytes(source, start, _lsn(primary), [oids["demo"]])

        before = catalog_of(source.primary("demo"))
        on_source, on_scratch = {}, {}
        for unlogged in ("false", "true"):
            start = _lsn(primary)
            storage = tmp_path / unlogged
            storage.mkdir()
            env = jobrun.job_env(
                source.primary("demo"),
                storage,
                source.bindir,
                SCRATCH_DATABASE_URL=source.primary(scratch),
                SCRATCH_UNLOGGED=unlogged,
            )
            result = jobrun.run(env, "dump")
            assert result.returncode == 0, result.stderr
            end = _lsn(primary)
            on_source[unlogged], on_scratch[unlogged] = _wal_bytes(
                source, start, end, [oids["demo"], oids[scratch]]
            )
    finally:
        with psycopg.connect(primary, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM RESET autovacuum")
            conn.execute("ALTER SYSTEM RESET wal_keep_size")
            conn.execute("SELECT pg_reload_conf()")
    assert on_source["false"] <= reads[0] and on_source["true"] <= reads[0]
    assert on_scratch["false"] > 100_000  # a logged copy's writes are seen: the measure works
    # UNLOGGED scratch tables (the default) keep the rows out of the scratch server's WAL;
    # with these 1,760 rows the catalog's changes are most of what is left.
    assert on_scratch["true"] < on_scratch["false"]
    assert catalog_of(source.primary("demo")) == before


# -- how long the source's snapshot is held -----------------------------------------------


@pytest.mark.one_major
def test_the_snapshot_on_the_standby_ends_once_the_rows_are_in(
    source: Source, tmp_path: Path
) -> None:
    """Indexes, foreign keys and the scan of the copy run on the scratch side only: by then
    the standby's transaction is over, so replay neither waits for it nor cancels it."""
    allow = tmp_path / "allow.json"
    allow.write_text(json.dumps(demo.allow_list()), encoding="utf-8")
    config = configuration.load({"DATABASE_URL": source.standby("demo"), "ALLOW_LIST": str(allow)})
    scratch_url = source.primary(source.create_database("scratch"))
    states: list[tuple[psycopg.pq.TransactionStatus, int]] = []

    def inspect(conn: psycopg.Connection[Any], located: Any) -> None:
        # The copy as it stands on the scratch side (not committed yet), and the standby's.
        (indexes,) = conn.execute(
            "SELECT count(*) FROM pg_indexes WHERE schemaname IN ('public', 'billing')"
        ).fetchone() or (0,)
        states.append((work.info.transaction_status, indexes))

    with db.connect(config) as work:
        scratch = scratchdb.ScratchDatabase(config, scratch_url, work)
        try:
            scratch.prepare()
            work.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            work.read_only = True
            the_plan = plan.build(
                catalog.read(work, allowlist.load(config.allow_list), config.scratch_schema),
                config.scratch_schema,
            )
            assert work.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
            results = scratch.build(work, the_plan, "0" * 64, inspect)
        finally:
            scratch.close()
    assert sum(r.rows for r in results) == 1760
    # Called once the indexes were built; the standby's transaction had ended by then.
    ((status, indexes),) = states
    assert indexes >= len(demo.allow_list())  # a primary key per table at least
    assert status == psycopg.pq.TransactionStatus.IDLE
