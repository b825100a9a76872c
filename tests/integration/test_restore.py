"""`restore`: the demo dump back under its original names, on every major; its refusals."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

import app
from tests import jobrun
from tests.conftest import Server
from tests.jobrun import SCRATCH
from tests.seed import demo

SOURCE_SCHEMAS = ["public", "billing"]
PASSWORD = "s3cret-canary-pw"


@dataclass
class Restored:
    server: Server
    source: str
    target: str
    env: dict[str, str]
    inspected: dict[str, Any]  # `inspect --format json`
    result: jobrun.Result  # the restore's


def _dbname(url: str) -> str:
    return url.rsplit("/", 1)[1]


def _with_password(url: str) -> str:
    """The same URL with a password in it (trust auth ignores it; the logs must hide it)."""
    return url.replace("postgresql://postgres@", f"postgresql://postgres:{PASSWORD}@", 1)


@pytest.fixture(scope="module")
def restored(pg_server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Restored]:
    names = [f"demo_{uuid.uuid4().hex[:8]}", f"dev_{uuid.uuid4().hex[:8]}"]
    source, target = (pg_server.create_database(n) for n in names)
    with psycopg.connect(source) as conn:
        demo.load(conn)
    env = jobrun.job_env(source, tmp_path_factory.mktemp("storage"), pg_server.bindir)
    dumped = jobrun.run(env, "dump")
    assert dumped.returncode == 0, dumped.stderr
    inspected = jobrun.run(env, "inspect", "--format", "json")
    assert inspected.returncode == 0, inspected.stderr
    result = jobrun.run(env, "restore", "--target", target, "--jobs", "2")
    yield Restored(pg_server, source, target, env, json.loads(inspected.stdout), result)
    for name in names:
        pg_server.drop_database(name)


def _split(key: str) -> tuple[str, str]:
    schema, dot, table = key.partition(".")
    return (schema, table) if dot else ("public", key)


def _count(url: str, schema: str, table: str) -> int:
    query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, table))
    return int(jobrun.rows(url, query)[0][0])


def test_restore_succeeds_and_leaves_no_scratch_schema(restored: Restored) -> None:
    assert restored.result.returncode == 0, restored.result.stderr
    assert restored.result.logs[-1]["message"] == "restore finished"
    schemas = jobrun.schemas(restored.target)
    assert {"public", "billing", "sanitised_dump"} <= schemas
    assert SCRATCH not in schemas


def test_tables_answer_under_their_original_names_with_the_manifest_row_counts(
    restored: Restored,
) -> None:
    tables = restored.inspected["manifest"]["tables"]
    listed = {".".join(_split(key)) for key in demo.allow_list()}
    assert {f"{t['schema']}.{t['name']}" for t in tables} == listed
    for t in tables:
        assert _count(restored.target, t["schema"], t["name"]) == t["rows"]
        assert t["rows"] == demo.TABLES[f"{t['schema']}.{t['name']}"]
    # The manifest also stays in the target, so the database tells which dump it holds.
    kept = jobrun.rows(restored.target, "SELECT manifest::text FROM sanitised_dump.manifest")
    assert json.loads(kept[0][0])["made_at"] == restored.inspected["manifest"]["made_at"]


SEQUENCES = """
SELECT t.schema, t.name, t.col, pg_get_serial_sequence(format('%I.%I', t.schema, t.name), t.col)
FROM (VALUES ('public', 'orgs', 'id'), ('public', 'users', 'id'),
             ('public', 'projects', 'id'), ('public', 'audit_events', 'id')) AS t(schema, name, col)
"""


def test_sequences_keep_their_names_and_positions(restored: Restored) -> None:
    # Runs before the inserts below, which move the sequences on.
    target = jobrun.rows(restored.target, SEQUENCES)
    assert target == jobrun.rows(restored.source, SEQUENCES)
    for _schema, table, _column, sequence in target:
        last = jobrun.rows(restored.target, f"SELECT last_value FROM {sequence}")[0][0]
        assert last == demo.TABLES[f"public.{table}"]


def test_inserts_with_default_ids_work(restored: Restored) -> None:
    with psycopg.connect(restored.target) as conn:
        org = conn.execute(
            "INSERT INTO public.orgs (name, slug) VALUES ('new org', 'new-org') RETURNING id"
        ).fetchone()[0]  # type: ignore[index]
        assert org == demo.TABLES["public.orgs"] + 1
        user = conn.execute(
            "INSERT INTO public.users (org_id, email, full_name, password_hash, signup_ip,"
            " external_id) VALUES (%s, 'new@example.org', 'New', 'x', '127.0.0.1',"
            " gen_random_uuid()) RETURNING id",
            [org],
        ).fetchone()[0]  # type: ignore[index]
        assert user == demo.TABLES["public.users"] + 1
        project = conn.execute(
            "INSERT INTO public.projects (org_id, owner_id, name) VALUES (%s, %s, 'p')"
            " RETURNING id",
            [org, user],
        ).fetchone()[0]  # type: ignore[index]
        assert project == demo.TABLES["public.projects"] + 1
        event = conn.execute(
            "INSERT INTO public.audit_events (user_id, action) VALUES (%s, 'login') RETURNING id",
            [user],
        ).fetchone()[0]  # type: ignore[index]
        assert event == demo.TABLES["public.audit_events"] + 1
        conn.execute(
            "INSERT INTO billing.invoices (org_id, number, amount, issued_on)"
            " VALUES (%s, 'INV-NEW', 1, current_date)",
            [org],
        )
        conn.rollback()


CONSTRAINTS = """
SELECT n.nspname, c.relname, con.conname, con.contype, pg_get_constraintdef(con.oid)
FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = ANY(%s) AND c.relname <> 'api_sessions' AND con.contype <> 'n'
ORDER BY 1, 2, 3
"""
INDEXES = """
SELECT schemaname, tablename, indexname, indexdef FROM pg_indexes
WHERE schemaname = ANY(%s) AND tablename <> 'api_sessions' ORDER BY 1, 2, 3
"""


def test_foreign_keys_indexes_and_constraints_are_those_of_the_source(restored: Restored) -> None:
    # search_path empty: every name prints schema-qualified, so `REFERENCES public.orgs(id)`
    # proves the foreign key points at the table under its original name.
    def read(url: str, query: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(url, options="-c search_path=") as conn:
            return conn.execute(query, [SOURCE_SCHEMAS]).fetchall()

    source, target = read(restored.source, CONSTRAINTS), read(restored.target, CONSTRAINTS)
    assert target == source
    assert ("billing", "invoices", "invoices_org_id_fkey", "f") in [r[:4] for r in target]
    assert read(restored.target, INDEXES) == read(restored.source, INDEXES)


def test_enums_and_domains_are_back_in_their_schema(restored: Restored) -> None:
    types = jobrun.rows(
        restored.target,
        "SELECT format_type(atttypid, NULL) FROM pg_attribute"
        " WHERE attrelid = 'public.users'::regclass AND attname IN ('mood', 'postcode', 'role')"
        " ORDER BY attname",
    )
    assert [t for (t,) in types] == ["mood", "postcode", "user_role"]  # in public: unqualified
    assert jobrun.rows(restored.target, "SELECT 'happy'::public.mood")[0][0] == "happy"


def test_inspect_describes_the_dump(restored: Restored) -> None:
    archive, manifest = restored.inspected["archive"], restored.inspected["manifest"]
    assert archive["needs_pg_restore"] == restored.server.major
    assert archive["format"] == "custom"
    assert manifest["job_version"] == app.__version__
    assert manifest["source"]["database"] == _dbname(restored.source)
    assert manifest["source"]["server_version_num"] // 10000 == restored.server.major
    assert manifest["allow_list_sha256"] == hashlib.sha256(demo.ALLOW_LIST.read_bytes()).hexdigest()
    by_name = {f"{t['schema']}.{t['name']}": t for t in manifest["tables"]}
    users = by_name["public.users"]
    assert users["kept"] == demo.allow_list()["users"]
    faked = {f["column"]: f["fake"] for f in users["faked"]}
    assert "email" in faked and "full_name" in faked and "id" not in faked
    assert users["generated"] == ["email_domain"]
    assert {"public.mood", "public.postcode", "public.user_role"} <= set(users["types"])


def test_the_manifest_fakes_are_those_in_the_restored_rows(restored: Restored) -> None:
    """Evaluating each fake the manifest shows, with the row numbers of the copy (by
    primary key), gives back exactly the values in the restored table."""
    for t in restored.inspected["manifest"]["tables"]:
        table = sql.Identifier(t["schema"], t["name"])
        for f in t["faked"]:
            query = sql.SQL(
                "SELECT count(*) FROM (SELECT *, row_number() OVER (ORDER BY id) AS n FROM {}) s"
                " WHERE ({})::text IS DISTINCT FROM {}::text"
            ).format(table, sql.SQL(f["fake"]), sql.Identifier("s", f["column"]))
            assert jobrun.rows(restored.target, query) == [(0,)], (t["name"], f)


def test_inspect_text_names_every_table(restored: Restored) -> None:
    shown = jobrun.run(restored.env, "inspect")
    assert shown.returncode == 0, shown.stderr
    for key in ("public.orgs", "public.users", "billing.invoices"):
        rows = demo.TABLES[key]
        assert f"{key}: {rows} rows" in shown.stdout
    assert f"restore needs   pg_restore {restored.server.major} or newer" in shown.stdout


# -- refusals and --clean: the same on every major ------------------------------------------


@pytest.mark.one_major
def test_a_target_that_is_not_empty_is_refused_unless_clean(restored: Restored) -> None:
    server = restored.server
    url = server.create_database()
    try:
        target = _with_password(url)
        first = jobrun.run(restored.env, "restore", "--target", target)
        assert first.returncode == 0, first.stderr
        # A developer's work on top of the first restore, and a table of their own.
        with psycopg.connect(url) as conn:
            conn.execute("DELETE FROM public.projects; ALTER TABLE public.orgs ADD COLUMN x int")
            conn.execute("CREATE TABLE public.keep_me (id int); INSERT INTO keep_me VALUES (7)")

        again = jobrun.run(restored.env, "restore", "--target", target)
        assert again.returncode == 2
        assert "is not empty (table billing.invoices" in again.messages()
        assert "--clean" in again.messages()
        assert _count(url, "public", "projects") == 0  # nothing was touched

        clean = jobrun.run(restored.env, "restore", "--target", target, "--clean")
        assert clean.returncode == 0, clean.stderr
        assert _count(url, "public", "projects") == demo.TABLES["public.projects"]
        assert "x" not in {
            c
            for (c,) in jobrun.rows(
                url, "SELECT attname FROM pg_attribute WHERE attrelid = 'public.orgs'::regclass"
            )
        }
        assert jobrun.rows(url, "SELECT id FROM public.keep_me") == [(7,)]  # not the dump's
        for result in (first, again, clean):
            assert PASSWORD not in result.stderr + result.stdout
    finally:
        server.drop_database(_dbname(url))


@pytest.mark.one_major
def test_the_source_is_refused_even_when_empty(pg_server: Server, tmp_path: Path) -> None:
    """Dump a database, empty it, restore onto it: only the identity check can catch that."""
    url = pg_server.create_database()
    try:
        with psycopg.connect(url) as conn:
            demo.load(conn)
        env = jobrun.job_env(url, tmp_path, pg_server.bindir)
        assert jobrun.run(env, "dump").returncode == 0
        with psycopg.connect(url) as conn:
            conn.execute("DROP SCHEMA public, billing CASCADE; CREATE SCHEMA public")
        for extra in ([], ["--clean"]):
            refused = jobrun.run(env, "restore", "--target", url, *extra)
            assert refused.returncode == 2, refused.stderr
            assert "the database the dump was made from" in refused.messages()
            left = {s for s in jobrun.schemas(url) if not s.startswith("pg_")}
            assert left == {"public", "information_schema"}  # nothing restored
    finally:
        pg_server.drop_database(_dbname(url))


SAME_NAMES = r"""
CREATE SCHEMA billing;
CREATE TYPE billing.kind AS ENUM ('a', 'b');
CREATE SEQUENCE public.ticket_no START 100;
CREATE TABLE public.accounts (id serial PRIMARY KEY, name text NOT NULL);
CREATE INDEX accounts_name_idx ON public.accounts (name);
CREATE TABLE billing.accounts (
    id serial PRIMARY KEY,
    account_id int REFERENCES public.accounts (id),
    kind billing.kind NOT NULL DEFAULT 'a',
    "we""ird\ name" text
);
CREATE INDEX accounts_name_idx ON billing.accounts ("we""ird\ name");
CREATE TABLE billing.tickets (no bigint PRIMARY KEY DEFAULT nextval('public.ticket_no'), note text);
INSERT INTO public.accounts (name) SELECT 'n' || i FROM generate_series(1, 30) AS i;
INSERT INTO billing.accounts (account_id, kind, "we""ird\ name")
    SELECT i, 'b', 'x' || i FROM generate_series(1, 25) AS i;
INSERT INTO billing.tickets (note) SELECT 'z' FROM generate_series(1, 7);
"""
SAME_NAMES_ALLOW = {
    "accounts": ["id", "name"],
    "billing.accounts": ["id", "account_id", "kind"],
    "billing.tickets": ["no"],
}
RELATIONS = """
SELECT n.nspname, c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname IN ('public', 'billing') ORDER BY 1, 2
"""


@pytest.mark.one_major
def test_tables_sequences_and_indexes_of_one_name_in_two_schemas_are_named_back(
    pg_server: Server, source_db: str, target_db: str, tmp_path: Path
) -> None:
    """The copy renames what clashes in the single scratch schema; restore undoes it all."""
    with psycopg.connect(source_db) as conn:
        conn.execute(SAME_NAMES)
    allow = tmp_path / "allow.json"
    allow.write_text(json.dumps(SAME_NAMES_ALLOW))
    env = jobrun.job_env(source_db, tmp_path, pg_server.bindir, ALLOW_LIST=str(allow))
    assert jobrun.run(env, "dump").returncode == 0
    shown = json.loads(jobrun.run(env, "inspect", "--format", "json").stdout)
    tables = {f"{t['schema']}.{t['name']}": t for t in shown["manifest"]["tables"]}
    assert tables["billing.accounts"]["scratch_name"] != "accounts"  # it had to be renamed
    assert tables["billing.accounts"]["faked"][0]["column"] == 'we"ird\\ name'

    restored = jobrun.run(env, "restore", "--target", target_db)
    assert restored.returncode == 0, restored.stderr
    assert jobrun.rows(target_db, RELATIONS) == jobrun.rows(source_db, RELATIONS)
    with psycopg.connect(target_db, options="-c search_path=") as conn:
        for query in (CONSTRAINTS, INDEXES):
            with psycopg.connect(source_db, options="-c search_path=") as source:
                assert conn.execute(query, [SOURCE_SCHEMAS]).fetchall() == (
                    source.execute(query, [SOURCE_SCHEMAS]).fetchall()
                )
        assert conn.execute("SELECT 'b'::billing.kind").fetchone() == ("b",)
        ids = conn.execute(
            "INSERT INTO billing.accounts (account_id) VALUES (1) RETURNING id, kind"
        ).fetchone()
        assert ids == (26, "a")
        assert conn.execute(
            "INSERT INTO billing.tickets DEFAULT VALUES RETURNING no"
        ).fetchone() == (107,)


@pytest.mark.one_major
def test_a_failed_restore_leaves_no_half_restored_schema(
    restored: Restored, target_db: str
) -> None:
    dump = ["restore", "--target", target_db, "--jobs", "2"]
    with psycopg.connect(target_db) as conn:
        conn.execute(
            "CREATE FUNCTION public.refuse() RETURNS event_trigger LANGUAGE plpgsql"
            " AS $$ BEGIN RAISE EXCEPTION 'no ALTER TABLE here'; END $$;"
            " CREATE EVENT TRIGGER refuse ON ddl_command_start WHEN TAG IN ('ALTER TABLE')"
            " EXECUTE FUNCTION public.refuse()"
        )
    failed = jobrun.run(restored.env, *dump)
    assert failed.returncode == 5, failed.stderr
    assert "no ALTER TABLE here" in failed.messages()
    assert SCRATCH not in jobrun.schemas(target_db)

    with psycopg.connect(target_db, autocommit=True) as conn:
        conn.execute("DROP EVENT TRIGGER refuse")
    again = jobrun.run(restored.env, *dump)
    assert again.returncode == 0, again.stderr
    assert _count(target_db, "billing", "invoices") == demo.TABLES["billing.invoices"]
