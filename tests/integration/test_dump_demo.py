"""The demo database, dumped and restored into an empty database, on every major."""

from __future__ import annotations

import stat
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from app.plan import MANIFEST_TABLE
from tests import jobrun
from tests.conftest import Server
from tests.jobrun import SCRATCH
from tests.seed import demo


@dataclass
class Dumped:
    server: Server
    source: str
    target: str
    storage: Path
    result: jobrun.Result
    restore: str  # pg_restore's stderr
    script: str  # the dump as SQL text


@pytest.fixture(scope="module")
def dumped(pg_server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dumped]:
    names = [f"demo_{uuid.uuid4().hex[:8]}", f"restored_{uuid.uuid4().hex[:8]}"]
    source, target = (pg_server.create_database(n) for n in names)
    with psycopg.connect(source) as conn:
        demo.load(conn)
    storage = tmp_path_factory.mktemp("storage")
    result = jobrun.run(jobrun.job_env(source, storage, pg_server.bindir), "dump")
    assert result.returncode == 0, result.stderr
    dump = storage / "sanitised.dump"
    restored = jobrun.restore(pg_server.bindir, dump, target)
    assert restored.returncode == 0, restored.stderr
    yield Dumped(
        pg_server,
        source,
        target,
        storage,
        result,
        restored.stderr,
        jobrun.restore_script(pg_server.bindir, dump),
    )
    for name in names:
        pg_server.drop_database(name)


def _kept(key: str) -> list[str]:
    return demo.allow_list()[key]


def _split(key: str) -> tuple[str, str]:
    return tuple(key.split(".", 1)) if "." in key else ("public", key)  # type: ignore[return-value]


def _listed() -> list[str]:
    return list(demo.allow_list())


def test_dump_is_published_with_mode_600_and_nothing_left_behind(dumped: Dumped) -> None:
    dump = dumped.storage / "sanitised.dump"
    assert stat.S_IMODE(dump.stat().st_mode) == 0o600
    assert jobrun.temp_files(dumped.storage) == []
    assert SCRATCH not in jobrun.schemas(dumped.source)


def test_restore_into_an_empty_database_has_no_error(dumped: Dumped) -> None:
    assert "error" not in dumped.restore.lower()


def test_no_canary_of_any_faked_column_is_in_the_dump(dumped: Dumped) -> None:
    assert demo.CANARY not in dumped.script.lower()
    # ... and the search would find one if it were there: the source is full of them.
    with psycopg.connect(dumped.source) as conn:
        found = conn.execute("SELECT count(*) FROM users WHERE email::text LIKE '%canary%'")
        assert found.fetchone()[0] > 0  # type: ignore[index]


def test_unlisted_table_is_absent(dumped: Dumped) -> None:
    tables = jobrun.rows(
        dumped.target,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
        [SCRATCH],
    )
    # The listed tables and the manifest that describes them, nothing else.
    assert {t for (t,) in tables} == {_split(k)[1] for k in _listed()} | {MANIFEST_TABLE}
    assert "api_sessions" not in dumped.script


@pytest.mark.parametrize("key", _listed())
def test_row_counts_and_kept_columns_are_identical(dumped: Dumped, key: str) -> None:
    schema, table = _split(key)
    columns = sql.SQL(", ").join(sql.Identifier(c) for c in _kept(key))
    query = sql.SQL("SELECT {cols} FROM {t} ORDER BY {cols}")
    source = jobrun.rows(dumped.source, query.format(cols=columns, t=sql.Identifier(schema, table)))
    target = jobrun.rows(
        dumped.target, query.format(cols=columns, t=sql.Identifier(SCRATCH, table))
    )
    assert len(source) == demo.TABLES[f"{schema}.{table}"]
    assert source == target


@pytest.mark.parametrize("key", _listed())
def test_faked_columns_keep_nulls_and_never_equal_the_original(dumped: Dumped, key: str) -> None:
    schema, table = _split(key)
    with psycopg.connect(dumped.source) as conn:
        all_columns = [
            r[0]
            for r in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = %s"
                " AND table_name = %s AND is_generated = 'NEVER'",
                [schema, table],
            )
        ]
    faked = [c for c in all_columns if c not in _kept(key)]
    for column in faked:
        query = sql.SQL("SELECT id, {c}::text FROM {t} ORDER BY id")
        col = sql.Identifier(column)
        source = dict(
            jobrun.rows(dumped.source, query.format(c=col, t=sql.Identifier(schema, table)))
        )
        target = dict(
            jobrun.rows(dumped.target, query.format(c=col, t=sql.Identifier(SCRATCH, table)))
        )
        assert source.keys() == target.keys()
        nulls = {k for k, v in source.items() if v is None}
        assert nulls == {k for k, v in target.items() if v is None}, column
        same = {k for k in source if source[k] is not None and source[k] == target[k]}
        # Numbers and dates may coincide by chance; a handful would be chance, more a leak.
        assert len(same) <= max(1, len(source) // 100), (column, sorted(same)[:5])


def test_constraints_and_indexes_survive(dumped: Dumped) -> None:
    query = """
        SELECT c.relname, con.contype, count(*)
        FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = ANY(%s) AND c.relname <> 'api_sessions' AND con.contype <> 'n'
        GROUP BY 1, 2 ORDER BY 1, 2
    """
    source = jobrun.rows(dumped.source, query, [["public", "billing"]])
    target = jobrun.rows(dumped.target, query, [[SCRATCH]])
    assert source == target
    assert ("audit_events", "f", 1) in target
    index_query = """
        SELECT tablename, count(*) FROM pg_indexes WHERE schemaname = ANY(%s)
        AND tablename <> 'api_sessions' GROUP BY 1 ORDER BY 1
    """
    assert jobrun.rows(dumped.source, index_query, [["public", "billing"]]) == jobrun.rows(
        dumped.target, index_query, [[SCRATCH]]
    )


def test_new_rows_get_fresh_ids_after_restore(dumped: Dumped) -> None:
    with psycopg.connect(dumped.target) as conn:
        conn.execute(sql.SQL("SET search_path = {}, public").format(sql.Identifier(SCRATCH)))
        org = conn.execute(
            "INSERT INTO orgs (name, slug) VALUES ('new org', 'new-org') RETURNING id"
        ).fetchone()[0]  # type: ignore[index]
        assert org > demo.TABLES["public.orgs"]
        user = conn.execute(
            "INSERT INTO users (org_id, email, full_name, password_hash, signup_ip, external_id)"
            " VALUES (%s, 'new@example.org', 'New', 'x', '127.0.0.1', gen_random_uuid())"
            " RETURNING id",
            [org],
        ).fetchone()[0]  # type: ignore[index]
        assert user > demo.TABLES["public.users"]
        event = conn.execute(
            "INSERT INTO audit_events (user_id, action) VALUES (%s, 'login') RETURNING id", [user]
        ).fetchone()[0]  # type: ignore[index]
        assert event > demo.TABLES["public.audit_events"]


def test_logs_tell_the_run(dumped: Dumped) -> None:
    logs = dumped.result.logs
    messages = [line["message"] for line in logs]
    assert messages[0] == "run started"
    assert messages.count("table copied") == len(_listed())
    published = next(line for line in logs if line["message"] == "published")
    assert published["size"] == (dumped.storage / "sanitised.dump").stat().st_size
    assert len(published["sha256"]) == 64
    assert messages[-1] == "run finished"


def test_a_second_run_gives_the_same_fakes(dumped: Dumped, tmp_path: Path) -> None:
    result = jobrun.run(jobrun.job_env(dumped.source, tmp_path, dumped.server.bindir), "dump")
    assert result.returncode == 0, result.stderr
    again = dumped.server.create_database()
    try:
        assert (
            jobrun.restore(dumped.server.bindir, tmp_path / "sanitised.dump", again).returncode == 0
        )
        query = sql.SQL("SELECT * FROM {} WHERE id <= %s ORDER BY id").format(
            sql.Identifier(SCRATCH, "users")
        )
        last = [demo.TABLES["public.users"]]
        assert jobrun.rows(dumped.target, query, last) == jobrun.rows(again, query, last)
    finally:
        dumped.server.drop_database(again.rsplit("/", 1)[1])
