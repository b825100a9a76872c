"""Hostile allow lists: broken files, arbitrary JSON, and names built to break SQL.

Each ends in a clean exit 2 or 3 naming the entry, or, for names PostgreSQL accepts, in a
correct copy of real tables created with those exact names. Never an SQL syntax error
caused by the input, never a traceback."""

from __future__ import annotations

import json
import os
import re
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from psycopg import sql

from app import allowlist, catalog, plan
from app.__main__ import main
from app.errors import AllowListMismatch, ConfigError
from app.scrub import ScratchSchema
from tests import jobrun
from tests.conftest import Server

REPORT_SECTION = "Hostile input"
SYSTEM_COLUMNS = {"tableoid", "xmin", "xmax", "cmin", "cmax", "ctid"}
PIECES = [
    '"', "'", ";", "\\", "$$", "$tag$", "--", "/*", "*/", " ", ".", "%s", "%(x)s", "{}",
    "é", "ß", "İ", "😀", "\u200b", "\n", "\t", "DROP TABLE people", "select", "Users",
    "public", "n", "s", "?", "*",
]  # fmt: skip


# -- broken files ----------------------------------------------------------------------------

BROKEN: dict[str, tuple[bytes, str]] = {
    "invalid JSON": (b'{"people": ["id",]}', "not valid JSON"),
    "an empty file": (b"", "is empty"),
    "only whitespace": (b"  \n\t\n", "is empty"),
    "`{}`": (b"{}", "lists no tables"),
    "a list where the object belongs": (b'["people", "orgs"]', "must be a JSON object"),
    "a string where the column list belongs": (b'{"people": "id"}', "must be a list"),
    "null where the column list belongs": (b'{"people": null}', "must be a list"),
    "a column listed twice": (b'{"people": ["id", "email", "id"]}', "listed twice"),
    "a table listed twice": (b'{"people": [], "people": ["id"]}', "appears twice"),
    "the same table under two keys": (b'{"people": [], "public.people": []}', "same table"),
    "a number as a column": (b'{"people": ["id", 7]}', "not a string"),
    "an empty column name": (b'{"people": [""]}', "not a column name"),
    "NUL in a table name": (b'{"peo\\u0000ple": []}', "not a table name"),
    "a lone UTF-16 surrogate in a name": (b'{"people": ["\\ud800"]}', "not a column name"),
    "an empty schema (`.people`)": (b'{".people": []}', "not a table name"),
    "Latin-1 bytes, not UTF-8": ('{"pöople": []}'.encode("latin-1"), "not UTF-8"),
    "JSON nested 100,000 deep": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
}


def run_in_process(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], env: dict[str, str]
) -> jobrun.Result:
    """`python -m app dump` without a new interpreter: the same main(), a tenth of the time."""
    for name in list(os.environ):
        if name.startswith("PG") or name == "DATABASE_URL":
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = main(["dump"])
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    captured = capsys.readouterr()
    return jobrun.Result(code, captured.err, captured.out)


@pytest.mark.parametrize("case", list(BROKEN))
@pytest.mark.fault("allow list file: {case}", "exit 2 naming the file and the problem")
def test_broken_allow_list_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    case: str,
    observe: Callable[[object], None],
) -> None:
    content, problem = BROKEN[case]
    path = tmp_path / "allow list.json"
    path.write_bytes(content)
    # Nothing listens here: reaching for the database would be a different failure (exit 4).
    env = jobrun.job_env("postgresql://u@127.0.0.1:1/db", tmp_path, tmp_path, ALLOW_LIST=str(path))
    if case == "invalid JSON":
        result = jobrun.run(env, "dump")  # one of them as users run it
    else:
        result = run_in_process(monkeypatch, capsys, env)
    assert result.returncode == 2, result.stderr
    (line,) = result.logs
    assert str(path) in line["message"] and problem in line["message"], line["message"]
    observe(f"exit {result.returncode}")


# -- arbitrary JSON --------------------------------------------------------------------------

any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)
names = st.one_of(st.sampled_from(PIECES), any_text)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | names,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(names, inner, max_size=4),
    max_leaves=12,
)
plausible = st.dictionaries(names, st.lists(names, unique=True, max_size=4), min_size=1, max_size=5)
allow_list_like = st.dictionaries(
    names, st.lists(names | json_values, max_size=4) | json_values, max_size=5
)


class Tally(Counter[str]):
    """Outcomes of generated examples, rendered into the report when the test is done."""

    def __str__(self) -> str:
        return ", ".join(f"{n} {outcome}" for outcome, n in sorted(self.items()))


def expected_entries(document: Any) -> list[tuple[str, str, tuple[str, ...]]] | None:
    """What SPEC §3 makes of `document`: its entries, or None where it must be refused."""
    if not isinstance(document, dict) or not document:
        return None
    entries, seen = [], set()
    for key, value in document.items():
        schema, table = allowlist.split_key(key)
        if not schema or not table or not is_name(key) or (schema, table) in seen:
            return None
        seen.add((schema, table))
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            return None
        if len(set(value)) != len(value) or not all(c and is_name(c) for c in value):
            return None
        entries.append((schema, table, tuple(value)))
    return entries


def is_name(name: str) -> bool:
    """A name PostgreSQL could hold, ignoring its length: UTF-8 without NUL."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in name


@pytest.fixture
def tally(observe: Callable[[object], None]) -> Tally:
    counts = Tally()
    observe(counts)
    return counts


@pytest.mark.fault(
    "200 generated JSON documents of any shape, names with quotes, `;`, `\\`, `$$`, unicode, "
    "NUL, lone surrogates; written as ASCII or as UTF-8",
    "each loaded exactly as SPEC §3 reads it, or refused (exit 2) naming the file; "
    "never another exception",
)
@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(document=st.one_of(plausible, allow_list_like, json_values), ascii_only=st.booleans())
def test_arbitrary_json(tmp_path: Path, tally: Tally, document: Any, ascii_only: bool) -> None:
    path = tmp_path / "allow_list.json"
    raw = json.dumps(document, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    path.write_bytes(raw)  # with lone surrogates and ensure_ascii off: not UTF-8
    try:
        loaded = allowlist.load(path)
    except ConfigError as exc:
        assert str(exc).startswith(f"allow list {path}")
        got = None
    else:
        got = [(e.schema, e.table, e.keep) for e in loaded.entries]
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        assert got is None
        tally["refused (not UTF-8)"] += 1
        return
    if isinstance(document, dict) and any(isinstance(v, dict) for v in document.values()):
        tally["object values (not judged)"] += 1  # a later form of SPEC §3
        return
    assert got == expected_entries(document)
    tally["loaded" if got is not None else "refused"] += 1


# -- hostile names on real tables ------------------------------------------------------------


def fit(name: str) -> str:
    """The name cut to the 63 bytes PostgreSQL keeps, without NUL; never empty."""
    cut = name.replace("\x00", "").encode("utf-8")[:63].decode("utf-8", "ignore")
    return cut or "x"


utf8_text = st.text(st.characters(codec="utf-8"), max_size=12)
identifiers = st.one_of(
    st.lists(st.one_of(st.sampled_from(PIECES), utf8_text), min_size=1, max_size=5).map("".join),
    st.text(st.characters(codec="utf-8"), min_size=40, max_size=70),  # near and past 63 bytes
)
created_names = identifiers.map(fit)
schema_names = created_names.map(lambda s: fit("x" + s) if s.lower().startswith("pg_") else s)
column_names = created_names.map(lambda c: c + "_" if c in SYSTEM_COLUMNS else c)
ghost_names = identifiers.filter(lambda n: "\x00" not in n)


@dataclass
class Table:
    schema: str
    name: str
    columns: list[tuple[str, str]]  # (name, type)


@dataclass
class Scenario:
    tables: list[Table]
    document: dict[str, list[str]]
    broken: list[str]  # keys of entries that must be named in an exit 2 or exit 3
    scratch: str


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    tables: list[Table] = []
    for _ in range(draw(st.integers(1, 3))):
        schema = draw(st.just("public") | schema_names)
        name = draw(created_names)
        columns = draw(
            st.lists(
                column_names,
                min_size=1,
                max_size=4,
                unique=True,
            )
        )
        types = draw(
            st.lists(
                st.sampled_from(["text", "integer", "varchar(12)"]),
                min_size=len(columns),
                max_size=len(columns),
            )
        )
        if all((t.schema, t.name) != (schema, name) for t in tables):
            tables.append(Table(schema, name, list(zip(columns, types, strict=True))))
    created = {(t.schema, t.name) for t in tables}
    document: dict[str, list[str]] = {}
    broken: list[str] = []
    for table in tables:
        if table.schema == "public" and "." not in table.name and draw(st.booleans()):
            key = table.name
        else:
            key = f"{table.schema}.{table.name}"
        if "." in table.schema:  # SPEC §3 splits at the first dot: no key can name it
            assume(allowlist.split_key(key) not in created)
            broken.append(key)
        document[key] = draw(st.lists(st.sampled_from([c for c, _ in table.columns]), unique=True))
    mischief = draw(st.sampled_from(["none", "none", "table", "column", "nul", "duplicate"]))
    key = next(iter(document))
    if mischief == "table":
        ghost = draw(ghost_names)
        assume(ghost not in document and allowlist.split_key(ghost) not in created)
        document[ghost] = []
        broken.append(ghost)
    elif mischief == "column":
        table = next(t for t in tables if key in (t.name, f"{t.schema}.{t.name}"))
        ghost = draw(ghost_names)
        assume(ghost not in [c for c, _ in table.columns])
        document[key] = [*document[key], ghost]
        broken.append(key)
    elif mischief == "nul":
        document[key] = [*document[key], draw(identifiers) + "\x00"]
        broken.append(key)
    elif mischief == "duplicate" and document[key]:
        document[key] = [*document[key], document[key][0]]
        broken.append(key)
    scratch = draw(schema_names)
    assume(scratch not in {t.schema for t in tables} | {"public", "information_schema"})
    return Scenario(tables, document, broken, scratch)


def create(conn: psycopg.Connection[Any], table: Table) -> None:
    if table.schema != "public":
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(table.schema)))
    conn.execute(
        sql.SQL("CREATE TABLE {} ({})").format(
            sql.Identifier(table.schema, table.name),
            sql.SQL(", ").join(
                sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t)) for c, t in table.columns
            ),
        )
    )
    values = {"text": "orig: '; $$ \\ \"é", "integer": 7, "varchar(12)": "orig;'$$\\"}
    for row in range(3):
        conn.execute(
            sql.SQL("INSERT INTO {} VALUES ({})").format(
                sql.Identifier(table.schema, table.name),
                sql.SQL(", ").join(
                    sql.Literal(None if row == 2 else values[t]) for _, t in table.columns
                ),
            )
        )


def copied_correctly(conn: psycopg.Connection[Any], built: plan.Plan, scenario: Scenario) -> None:
    """Kept columns verbatim, faked ones `<column>_<n>`-like and never the original, NULLs kept."""
    for tp in built.tables:
        source = sql.Identifier(tp.table.schema, tp.table.name)
        target = sql.Identifier(scenario.scratch, tp.scratch_name)
        for column in tp.table.columns:
            col = sql.Identifier(column.name)
            query = sql.SQL("SELECT {}::text FROM {} ORDER BY 1")
            before = [r[0] for r in conn.execute(query.format(col, source))]
            after = [r[0] for r in conn.execute(query.format(col, target))]
            assert len(before) == len(after) == 3
            if column.kept:
                assert after == before, column.name
                continue
            assert [v is None for v in after].count(True) == before.count(None)
            fakes = [v for v in after if v is not None]
            assert len(set(fakes)) == len(fakes) and not set(fakes) & set(before), column.name
            if column.type_sql == "text":
                assert all(re.fullmatch(re.escape(column.name) + r"_\d+", v) for v in fakes)


@pytest.fixture
def conn(source_db: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(source_db) as connection:
        yield connection


@pytest.mark.one_major
@pytest.mark.fault(
    "40 generated allow lists over real tables created with hostile schema, table and "
    "column names (quotes, `;`, `\\`, `$$`, unicode, 63-byte and longer names), and a hostile "
    "scratch schema name; some with a missing table or column, a NUL or a duplicate",
    "a clean exit 2 or 3 naming the bad entry, or a correct copy (kept values verbatim, fakes "
    "`<column>_<n>`); never an SQL error",
)
@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scenario=scenarios())
def test_hostile_names(conn: psycopg.Connection[Any], tally: Tally, scenario: Scenario) -> None:
    try:
        for table in scenario.tables:
            create(conn, table)
        try:
            entries = allowlist.parse(scenario.document)
            allow = allowlist.AllowList(Path("allow_list.json"), entries, "")
            built = plan.build(catalog.read(conn, allow, scenario.scratch), scenario.scratch)
        except (ConfigError, AllowListMismatch) as exc:
            assert scenario.broken, exc
            assert any(repr(key) in str(exc) for key in scenario.broken), exc
            tally[f"exit {exc.exit_code}"] += 1
            return
        assert not scenario.broken, scenario.document
        ScratchSchema(conn, built).build()
        copied_correctly(conn, built, scenario)
        tally["copied"] += 1
    finally:
        conn.rollback()


HOSTILE_SCHEMA = 'we"ird; $$ schema\\'
HOSTILE_TABLE = "Robert'); DROP TABLE people;--"
HOSTILE_COLUMNS = ['a"b', "c;d", "$$e$$", "f\\g", "é😀", "select", "n", "s", "x" * 63]
HOSTILE_SCRATCH = 'scr"atch $$ ;\\ é'


@pytest.mark.fault(
    'a real run over tables with hostile names (schema `we"ird; $$ schema\\`, table '
    "`Robert'); DROP TABLE people;--`, columns with quotes, `;`, `$$`, `\\`, emoji, `select`, "
    "a 63-byte name; a table `a.b` listed as `public.a.b`), SCRATCH_SCHEMA "
    '`scr"atch $$ ;\\ é`',
    "exit 0; the dump restores with the same names; kept values verbatim, faked ones replaced",
)
def test_hostile_names_end_to_end(
    pg_server: Server,
    source_db: str,
    target_db: str,
    tmp_path: Path,
    observe: Callable[[object], None],
) -> None:
    tables = [
        Table(HOSTILE_SCHEMA, HOSTILE_TABLE, [(c, "text") for c in HOSTILE_COLUMNS]),
        Table("public", "a.b", [("id", "integer"), ("secret", "text")]),
    ]
    document = {f"{HOSTILE_SCHEMA}.{HOSTILE_TABLE}": HOSTILE_COLUMNS[::2], "public.a.b": ["id"]}
    with psycopg.connect(source_db, autocommit=True) as conn:
        for table in tables:
            create(conn, table)
    allow = tmp_path / "allow_list.json"
    allow.write_text(json.dumps(document))
    env = jobrun.job_env(
        source_db,
        tmp_path,
        pg_server.bindir,
        ALLOW_LIST=str(allow),
        SCRATCH_SCHEMA=HOSTILE_SCRATCH,
    )
    result = jobrun.run(env, "dump")
    assert result.returncode == 0, result.stderr
    restored = jobrun.restore(pg_server.bindir, tmp_path / "sanitised.dump", target_db)
    assert restored.returncode == 0, restored.stderr
    for table in tables:
        for column, _ in table.columns:
            before = column_values(source_db, table.schema, table.name, column)
            after = column_values(target_db, HOSTILE_SCRATCH, table.name, column)
            if column in document[f"{table.schema}.{table.name}"]:
                assert after == before, column
            else:
                assert after.count(None) == before.count(None) == 1, column
                assert not {v for v in after if v is not None} & set(before), column
    observe(f"exit {result.returncode}; restored {len(tables)} tables under their names")


def column_values(url: str, schema: str, table: str, column: str) -> list[str | None]:
    query = sql.SQL("SELECT {}::text FROM {} ORDER BY 1").format(
        sql.Identifier(column), sql.Identifier(schema, table)
    )
    return [row[0] for row in jobrun.rows(url, query)]
