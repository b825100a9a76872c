"""Every fake, evaluated by a real server: it fits its type and is distinct where it must be."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from app import allowlist, catalog, fakes, plan
from app.catalog import TypeInfo
from tests.conftest import Server

SETUP = """
CREATE EXTENSION IF NOT EXISTS citext;
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN code6 AS varchar(6);
CREATE DOMAIN positive AS integer CHECK (VALUE > 0);
CREATE DOMAIN mood_d AS mood;
"""

# (column type, unique, rows, pattern every value's text must match or None)
CASES: list[tuple[str, bool, int, str | None]] = [
    ("text", True, 100_000, r"^v_\d+$"),
    ("varchar(40)", True, 100_000, r"^v_\d+$"),
    ("varchar(6)", True, 100_000, r"^[0-9a-z_]{1,6}$"),
    ("char(3)", True, 4_000, r"^[0-9a-v_ ]{3}$"),
    ("code6", True, 100_000, r"^[0-9a-z_]{1,6}$"),
    ("citext", True, 100_000, r"^v_\d+$"),
    ("name", True, 10_000, r"^v_\d+$"),
    ("smallint", True, 30_000, None),
    ("integer", True, 100_000, None),
    ("bigint", True, 100_000, None),
    ("positive", True, 100_000, None),
    ("numeric(10,2)", True, 100_000, None),
    ("numeric(3,0)", True, 999, None),
    ("numeric", True, 10_000, None),
    ("real", True, 10_000, None),
    ("double precision", True, 10_000, None),
    ("money", True, 10_000, None),
    ("boolean", False, 1_000, r"^(true|false)$"),
    ("date", True, 100_000, None),
    ("time", True, 10_000, None),
    ("timetz", True, 10_000, None),
    ("timestamp", True, 100_000, None),
    ("timestamptz", True, 100_000, None),
    ("interval", True, 10_000, None),
    ("uuid", True, 100_000, r"^[0-9a-f]{8}-0000-0000-0000-[0-9a-f]{12}$"),
    ("json", False, 1_000, r'^\{"fake" ?: ?"v_\d+"\}$'),
    ("jsonb", True, 100_000, r'^\{"fake": "v_\d+"\}$'),
    ("bytea", True, 10_000, None),
    ("inet", True, 100_000, r"^2001:db8::"),
    ("cidr", True, 10_000, r"^2001:db8:"),
    ("macaddr", True, 10_000, r"^fa:"),
    ("macaddr8", True, 10_000, r"^fa:"),
    ("bit(12)", True, 4_000, r"^[01]{12}$"),
    ("varbit", True, 10_000, r"^[01]+$"),
    ("varbit(8)", False, 1_000, r"^[01]{8}$"),
    ("xml", False, 1_000, r"^<fake>v_\d+</fake>$"),
    ("tsvector", True, 10_000, r"^'v_\d+'$"),
    ("mood", False, 1_000, r"^(sad|ok|happy)$"),
    ("mood_d", False, 1_000, r"^(sad|ok|happy)$"),
    ("text[]", True, 10_000, r"^\{v_\d+\}$"),
    ("integer[]", True, 10_000, r"^\{\d+\}$"),
    ("varchar(4)[]", False, 1_000, None),
    ("mood[]", False, 1_000, r"^\{(sad|ok|happy)\}$"),
    ("int4range", True, 10_000, None),
    ("int8range", True, 10_000, None),
    ("numrange", True, 10_000, None),
    ("daterange", True, 10_000, None),
    ("tsrange", True, 10_000, None),
    ("tstzrange", True, 10_000, None),
]


@pytest.fixture(scope="module")
def db(pg_server: Server) -> Iterator[psycopg.Connection]:
    url = pg_server.create_database()
    with psycopg.connect(url, autocommit=True, prepare_threshold=None) as conn:
        conn.execute(SETUP)
        columns = sql.SQL(", ").join(
            sql.SQL("{} {} NOT NULL {}").format(
                sql.Identifier(f"c{i}"), sql.SQL(t), sql.SQL("UNIQUE" if unique else "")
            )
            for i, (t, unique, *_) in enumerate(CASES)
        )
        conn.execute(sql.SQL("CREATE TABLE source (id int PRIMARY KEY, {})").format(columns))
        yield conn
    pg_server.drop_database(url.rsplit("/", 1)[1])


@pytest.fixture(scope="module")
def table_plan(db: psycopg.Connection) -> plan.TablePlan:
    allow = allowlist.AllowList(Path("test"), allowlist.parse({"source": ["id"]}), "")
    with db.transaction():
        built = plan.build(catalog.read(db, allow, "scratch"), "scratch")
    return built.tables[0]


@pytest.mark.parametrize(
    ("type_sql", "unique", "rows", "pattern"), CASES, ids=[c[0] for c in CASES]
)
def test_fake_fits_its_type_and_is_distinct(
    db: psycopg.Connection,
    table_plan: plan.TablePlan,
    type_sql: str,
    unique: bool,
    rows: int,
    pattern: str | None,
) -> None:
    index = [c[0] for c in CASES].index(type_sql)
    column = table_plan.columns[index + 1]
    assert column.column.name == f"c{index}" and column.fake is not None
    # The name of the column is part of text fakes: evaluate as if it were called "v".
    expression = (
        column.fake.as_string(db).replace(f"'c{index}_'", "'v_'").replace(f"'c{index}'", "'v'")
    )
    db.execute(sql.SQL("DROP TABLE IF EXISTS out"))
    db.execute(sql.SQL("CREATE TABLE out (v {} NOT NULL)").format(sql.SQL(type_sql)))
    db.execute(
        sql.SQL("INSERT INTO out SELECT {} FROM generate_series(1::bigint, {}) AS s(n)").format(
            sql.SQL(expression), sql.Literal(rows)
        )
    )
    count, distinct = db.execute("SELECT count(*), count(DISTINCT v::text) FROM out").fetchone()  # type: ignore[misc]
    assert count == rows
    if unique:
        assert distinct == rows
    if pattern:
        bad = [v for (v,) in db.execute("SELECT v::text FROM out") if not re.match(pattern, v)]
        assert bad == []


def test_fakes_are_deterministic_and_differ_between_columns() -> None:
    a = fakes.column_seed("public.users", "email")
    assert a == fakes.column_seed("public.users", "email")
    assert a != fakes.column_seed("public.users", "phone")
    assert a != fakes.column_seed("public.orgs", "email")


def test_an_unknown_type_is_refused_with_its_name() -> None:
    point = TypeInfo(
        oid=600,
        schema="pg_catalog",
        name="point",
        kind="b",
        is_array=False,
        element=0,
        base=0,
        typmod=-1,
        not_null=False,
        type_sql="point",
        base_sql="-",
        default_sql=None,
        collation=None,
        extension=None,
        labels=(),
        range_subtype=None,
        checks=(),
    )
    target = fakes.Target("public.places", "location", unique=False)
    with pytest.raises(fakes.Unfakeable, match="point"):
        fakes.fake(target, 600, -1, {600: point}, lambda t: sql.SQL(t.type_sql), sql.SQL("n"))
