"""The traps of copying a schema (PITFALLS), each on a real server of every major."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests import jobrun
from tests.conftest import Server
from tests.jobrun import SCRATCH

SCHEMA = """
CREATE EXTENSION citext;
CREATE SCHEMA "Weird Schema";
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TYPE "Weird Schema".colour AS ENUM ('red', 'green');
CREATE DOMAIN code6 AS varchar(6);
CREATE DOMAIN positive AS integer CHECK (VALUE > 0);
CREATE TABLE unlisted_owner (id int PRIMARY KEY);
INSERT INTO unlisted_owner SELECT generate_series(1, 10);
CREATE TABLE "Select" (
    "Id" serial PRIMARY KEY,
    "Full Name" text NOT NULL,
    "select" text,
    n text,
    code code6 UNIQUE,
    short char(3) UNIQUE,
    price numeric(10, 2),
    qty smallint CHECK (qty >= 0),
    pos positive,
    email citext UNIQUE,
    tags text[],
    nums integer[],
    feeling mood DEFAULT 'ok',
    colour "Weird Schema".colour,
    owner_id int REFERENCES unlisted_owner (id),
    spot point,
    upper_name text GENERATED ALWAYS AS (upper("Full Name")) STORED
);
CREATE INDEX select_lower_name ON "Select" (lower("Full Name")) WHERE feeling <> 'sad';
INSERT INTO "Select" ("Full Name", "select", n, code, short, price, qty, pos, email, tags, nums,
                      feeling, colour, owner_id, spot)
SELECT 'Canary Person ' || i, CASE WHEN i % 7 = 0 THEN NULL ELSE 'sel-canary-' || i END,
       'n-canary-' || i, 'c' || i, lpad(to_hex(i), 3, '0'), i * 1.5, i % 100, i,
       'Canary' || i || '@Example.org', ARRAY['canary-tag', 'b' || i], ARRAY[i, i + 1],
       (ARRAY['sad', 'ok', 'happy'])[1 + i % 3]::mood, 'red', 1 + i % 10, point(i, i)
FROM generate_series(1, 1000) AS i;
CREATE TABLE "Weird Schema"."a.b" (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    select_id int NOT NULL REFERENCES "Select" ("Id") DEFERRABLE INITIALLY DEFERRED,
    select_code code6 REFERENCES "Select" (code),
    secret text,
    secret_length int GENERATED ALWAYS AS (length(secret)) STORED,
    happened tstzrange
);
INSERT INTO "Weird Schema"."a.b" (select_id, select_code, secret, happened)
SELECT 1 + i % 1000, 'c' || (1 + i % 1000), 'the-canary-' || i,
       tstzrange('2024-01-01'::timestamptz + i * interval '1 day', NULL)
FROM generate_series(1, 500) AS i;
"""

ALLOW = {
    "Select": ["Id", "colour", "owner_id", "spot", "feeling", "qty"],
    "Weird Schema.a.b": ["id", "select_id", "select_code"],
}


@dataclass
class Run:
    server: Server
    source: str
    target: str
    result: jobrun.Result
    script: str
    check: jobrun.Result


@pytest.fixture(scope="module")
def run(pg_server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    source = pg_server.create_database()
    target = pg_server.create_database()
    with psycopg.connect(source) as conn:
        conn.execute(SCHEMA)
    tmp = tmp_path_factory.mktemp("traps")
    allow = tmp / "allow.json"
    allow.write_text(json.dumps(ALLOW))
    env = jobrun.job_env(source, tmp, pg_server.bindir, ALLOW_LIST=str(allow))
    result = jobrun.run(env, "dump")
    assert result.returncode == 0, result.stderr
    restored = jobrun.restore(pg_server.bindir, tmp / "sanitised.dump", target)
    assert restored.returncode == 0, restored.stderr
    check = jobrun.run(env, "check", "--format", "json")
    yield Run(
        pg_server,
        source,
        target,
        result,
        jobrun.restore_script(pg_server.bindir, tmp / "sanitised.dump"),
        check,
    )
    for url in (source, target):
        pg_server.drop_database(url.rsplit("/", 1)[1])


def test_odd_names_and_second_schema_tables_are_copied(run: Run) -> None:
    counts = jobrun.rows(
        run.target,
        sql.SQL("SELECT (SELECT count(*) FROM {}), (SELECT count(*) FROM {})").format(
            sql.Identifier(SCRATCH, "Select"), sql.Identifier(SCRATCH, "a.b")
        ),
    )
    assert counts == [(1000, 500)]


def test_no_original_value_of_a_faked_column_is_in_the_dump(run: Run) -> None:
    assert "canary" not in run.script.lower()


def test_short_unique_columns_get_distinct_fakes_that_fit(run: Run) -> None:
    ((short, code, email),) = jobrun.rows(
        run.target,
        sql.SQL(
            "SELECT count(DISTINCT short), count(DISTINCT code), count(DISTINCT lower(email::text))"
            " FROM {}"
        ).format(sql.Identifier(SCRATCH, "Select")),
    )
    assert (short, code, email) == (1000, 1000, 1000)


def test_generated_columns_are_recomputed_from_the_fakes(run: Run) -> None:
    rows = jobrun.rows(
        run.target,
        sql.SQL('SELECT upper_name = upper("Full Name") FROM {}').format(
            sql.Identifier(SCRATCH, "Select")
        ),
    )
    assert rows and all(ok for (ok,) in rows)
    lengths = jobrun.rows(
        run.target,
        sql.SQL("SELECT secret_length = length(secret) FROM {}").format(
            sql.Identifier(SCRATCH, "a.b")
        ),
    )
    assert all(ok for (ok,) in lengths)


def test_enums_and_domains_live_in_the_dump(run: Run) -> None:
    types = jobrun.rows(
        run.target,
        "SELECT t.typname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace"
        " WHERE n.nspname = %s AND t.typtype IN ('e', 'd') ORDER BY 1",
        [SCRATCH],
    )
    assert [t for (t,) in types] == ["code6", "colour", "mood", "positive"]
    assert jobrun.rows(
        run.target, "SELECT count(*) FROM pg_extension WHERE extname = 'citext'"
    ) == [(1,)]


def test_foreign_keys_on_fakes_or_to_unlisted_tables_are_left_out_and_listed(run: Run) -> None:
    fks = jobrun.rows(
        run.target,
        "SELECT conname, condeferrable FROM pg_constraint c JOIN pg_namespace n"
        " ON n.oid = c.connamespace WHERE n.nspname = %s AND contype = 'f'",
        [SCRATCH],
    )
    assert fks == [("a.b_select_id_fkey", True)]
    logged = {
        line["foreign_key"] for line in run.result.logs if line["message"] == "foreign key left out"
    }
    assert logged == {
        "public.Select.Select_owner_id_fkey -> a table that is not copied",
        "Weird Schema.a.b.a.b_select_code_fkey -> public.Select",
    }
    report = json.loads(run.check.stdout)
    assert {fk["foreign_key"] for fk in report["foreign_keys_left_out"]} == logged
    assert report["unlisted_tables"] == ["public.unlisted_owner"]


def test_serial_and_identity_continue_after_the_copied_values(run: Run) -> None:
    with psycopg.connect(run.target) as conn:
        conn.execute(sql.SQL("SET search_path = {}, public").format(sql.Identifier(SCRATCH)))
        new = conn.execute(
            """INSERT INTO "Select" ("Full Name") VALUES ('x') RETURNING "Id", feeling::text"""
        ).fetchone()
        assert new == (1001, "ok")
        child = conn.execute('INSERT INTO "a.b" (select_id) VALUES (1001) RETURNING id').fetchone()
        assert child == (501,)


def test_partial_expression_index_survives(run: Run) -> None:
    ((definition,),) = jobrun.rows(
        run.target,
        "SELECT indexdef FROM pg_indexes WHERE schemaname = %s AND indexname = 'select_lower_name'",
        [SCRATCH],
    )
    assert "lower(" in definition and "WHERE" in definition


@pytest.mark.one_major
@pytest.mark.parametrize(
    ("setup", "allow", "code", "message"),
    [
        (
            "CREATE TABLE places (id int PRIMARY KEY, spot point)",
            {"places": ["id"]},
            3,
            "column public.places.spot of type point",
        ),
        (
            "CREATE TABLE t (id int PRIMARY KEY, email text CHECK (email LIKE '%@%'));"
            "INSERT INTO t VALUES (1, 'a@b.c')",
            {"t": ["id"]},
            3,
            "t_email_check rejects a fake",
        ),
        (
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1';"
            "CREATE TABLE t (id int PRIMARY KEY, x int DEFAULT f())",
            {"t": ["id", "x"]},
            3,
            "function f() is used by t",
        ),
        (
            "CREATE TABLE t (id int PRIMARY KEY)",
            {"t": ["id", "nope"], "missing": []},
            3,
            "column 'nope' of table 'public.t'",
        ),
        (
            'CREATE TABLE "Users" (id int PRIMARY KEY)',
            {"users": ["id"]},
            3,
            'did you mean public."Users"',
        ),
        (
            f"CREATE SCHEMA {SCRATCH}; CREATE TABLE t (id int PRIMARY KEY)",
            {"t": ["id"]},
            2,
            "was not made by this job",
        ),
        (
            "CREATE VIEW v AS SELECT 1 AS id",
            {"v": ["id"]},
            3,
            "is not a table",
        ),
    ],
    ids=["point", "check", "function", "missing", "case", "foreign-schema", "view"],
)
def test_what_does_not_fit_stops_the_run_and_writes_nothing(
    pg_server: Server,
    source_db: str,
    tmp_path: Path,
    setup: str,
    allow: dict[str, list[str]],
    code: int,
    message: str,
) -> None:
    with psycopg.connect(source_db) as conn:
        conn.execute(setup)
    schemas_before = jobrun.schemas(source_db)
    path = tmp_path / "allow.json"
    path.write_text(json.dumps(allow))
    result = jobrun.run(
        jobrun.job_env(source_db, tmp_path, pg_server.bindir, ALLOW_LIST=str(path)), "dump"
    )
    assert result.returncode == code, result.stderr
    assert message in result.logs[-1]["message"]
    assert result.logs[-1]["exit_code"] == code
    assert jobrun.schemas(source_db) == schemas_before
    assert not (tmp_path / "sanitised.dump").exists()
    assert jobrun.temp_files(tmp_path) == []


@pytest.mark.one_major
def test_max_scratch_bytes_refuses_a_copy_too_big(
    pg_server: Server, source_db: str, tmp_path: Path
) -> None:
    with psycopg.connect(source_db) as conn:
        conn.execute(
            "CREATE TABLE t AS SELECT i AS id, repeat('x', 100) AS pad"
            " FROM generate_series(1, 10000) i"
        )
    path = tmp_path / "allow.json"
    path.write_text('{"t": ["id"]}')
    env = jobrun.job_env(
        source_db, tmp_path, pg_server.bindir, ALLOW_LIST=str(path), MAX_SCRATCH_BYTES="100kB"
    )
    result = jobrun.run(env, "dump")
    assert result.returncode == 3
    assert "MAX_SCRATCH_BYTES" in result.logs[-1]["message"]
    assert SCRATCH not in jobrun.schemas(source_db)


@pytest.mark.one_major
def test_a_migration_holding_a_lock_makes_the_run_give_up_quickly(
    pg_server: Server, source_db: str, tmp_path: Path
) -> None:
    with psycopg.connect(source_db) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, email text)")
    path = tmp_path / "allow.json"
    path.write_text('{"t": ["id"]}')
    env = jobrun.job_env(
        source_db, tmp_path, pg_server.bindir, ALLOW_LIST=str(path), LOCK_TIMEOUT="300ms"
    )
    with psycopg.connect(source_db) as migration:
        migration.execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
        result = jobrun.run(env, "dump")
    assert result.returncode == 4, result.stderr
    assert "LOCK_TIMEOUT=300ms" in result.logs[-1]["message"]
    assert SCRATCH not in jobrun.schemas(source_db)


@pytest.mark.one_major
def test_the_job_is_visible_to_operators_by_name(
    pg_server: Server, source_db: str, tmp_path: Path
) -> None:
    with psycopg.connect(source_db) as conn:
        conn.execute(
            "CREATE TABLE t AS SELECT i AS id, 'x' || i AS email FROM generate_series(1, 200) i;"
            "ALTER TABLE t ADD PRIMARY KEY (id);"
            "ALTER TABLE t ADD CONSTRAINT slow CHECK (length(pg_sleep(0.01)::text) = 0)"
        )
    path = tmp_path / "allow.json"
    path.write_text('{"t": ["id"]}')
    env = jobrun.job_env(source_db, tmp_path, pg_server.bindir, ALLOW_LIST=str(path))
    job = jobrun.start(env, "dump")
    try:
        seen: set[str] = set()
        with psycopg.connect(source_db, autocommit=True) as conn:
            for _ in range(100):
                seen |= {
                    r[0]
                    for r in conn.execute(
                        "SELECT application_name FROM pg_stat_activity WHERE datname ="
                        " current_database() AND pid <> pg_backend_pid()"
                    )
                }
                if "sanitised-dump" in seen or job.poll() is not None:
                    break
                time.sleep(0.05)
        assert "sanitised-dump" in seen
    finally:
        _, err = job.communicate(timeout=120)
    assert job.returncode == 0, err
