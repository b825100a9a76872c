"""What the copy will do, decided before anything is written.

For every listed table: the scratch name, each column kept, faked, set to a value or
pseudonymised (and how), whether rows are copied at all, the foreign keys that survive and
those left out. `check` and `plan` print it; `scrub` carries it out. Building it raises
AllowListMismatch for everything that can be known up front: unfakeable types, types or
functions the dump could not carry, name clashes, `set` values that cannot fit; `validate`
then asks the server whether each `set` value fits its column's type and CHECKs.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from app import pseudonym
from app.allowlist import ROW_NUMBER as SET_ROW_NUMBER
from app.allowlist import SetValue
from app.catalog import Catalog, Column, Constraint, Table, TypeInfo, as_sql
from app.errors import AllowListMismatch
from app.fakes import Target, Unfakeable, fake

ROW_NUMBER = "n"
# The manifest's table in the scratch schema: no copied table, index or sequence may take it.
MANIFEST_TABLE = "sanitised_dump_manifest"
_SIMPLE_NEXTVAL = re.compile(r"^nextval\('(?:[^']|'')+'::regclass\)$")
_MAX_IDENTIFIER = 63


KEPT = "kept"
FAKED = "faked"
SET = "set"
PSEUDONYMISED = "pseudonymised"
GENERATED = "generated"
NO_ROWS = "no rows"


@dataclass(frozen=True)
class ColumnPlan:
    column: Column
    expression: sql.Composable | None  # None: not inserted (generated, or no rows copied)
    fake: sql.Composable | None  # what replaces the original (faked, set, pseudonymised)
    action: str = KEPT  # KEPT, FAKED, SET, PSEUDONYMISED, GENERATED or NO_ROWS
    value: SetValue | None = None  # the allow list's value of a SET column


@dataclass(frozen=True)
class ForeignKey:
    table: Table
    constraint: Constraint
    kept: bool
    reason: str  # why it is left out, empty when kept

    def describe(self, catalog: Catalog) -> str:
        ref = catalog.table(self.constraint.ref_table)
        target = ref.qualified if ref else "a table that is not copied"
        return f"{self.table.qualified}.{self.constraint.name} -> {target}"


@dataclass
class TablePlan:
    table: Table
    scratch_name: str
    columns: list[ColumnPlan]
    order_by: tuple[str, ...]
    row_number: str
    foreign_keys: list[ForeignKey] = field(default_factory=list)
    # source index (or constraint) name -> its name in the scratch schema, as the copy
    # built it; the manifest carries it so that restore can name each index back.
    index_names: dict[str, str] = field(default_factory=dict)

    @property
    def kept(self) -> list[str]:
        return self._named(KEPT)

    @property
    def faked(self) -> list[str]:
        return self._named(FAKED)

    @property
    def pseudonymised(self) -> list[str]:
        return self._named(PSEUDONYMISED)

    @property
    def set_values(self) -> dict[str, Any]:
        """Column -> the JSON value the allow list sets it to (for reports and the manifest)."""
        return {c.column.name: c.value.raw for c in self.columns if c.value is not None}

    @property
    def structure_only(self) -> bool:
        """`rows: "none"`: the table is created with its full structure and left empty."""
        return self.table.entry.structure_only

    @property
    def note(self) -> str | None:
        return self.table.entry.note

    @property
    def needs_row_number(self) -> bool:
        return any(
            c.action == FAKED or (c.value is not None and c.value.numbered) for c in self.columns
        )

    def _named(self, action: str) -> list[str]:
        return [c.column.name for c in self.columns if c.action == action]


@dataclass
class Plan:
    catalog: Catalog
    scratch_schema: str
    tables: list[TablePlan]
    names: Namer  # relation names taken in the scratch schema

    @property
    def left_out(self) -> list[ForeignKey]:
        return [fk for t in self.tables for fk in t.foreign_keys if not fk.kept]

    @property
    def needs_pseudonym_key(self) -> bool:
        return any(t.pseudonymised for t in self.tables)

    @property
    def structure_only(self) -> list[TablePlan]:
        return [t for t in self.tables if t.structure_only]

    def scratch_table(self, oid: int) -> TablePlan | None:
        return next((t for t in self.tables if t.table.oid == oid), None)


def build(catalog: Catalog, scratch_schema: str) -> Plan:
    problems: list[str] = []
    problems += _uncopyable_types(catalog)
    problems += [
        f"function {f.function} is used by {f.relation} ({f.what}): a dump of the scratch schema "
        "cannot carry it; drop that default, CHECK or index from the copy's tables, or leave "
        "the table out"
        for f in catalog.functions
    ]
    problems += _name_clashes(catalog)
    names = Namer()
    tables = []
    for table in catalog.tables:
        try:
            tables.append(_table_plan(catalog, table, names.take(table.name)))
        except _Problems as exc:
            problems += exc.args[0]
    if problems:
        raise AllowListMismatch("allow list does not fit the database: " + "; ".join(problems))
    plan = Plan(catalog, scratch_schema, tables, names)
    for tp in tables:
        tp.foreign_keys = [_foreign_key(plan, tp, c) for c in tp.table.constraints if c.kind == "f"]
    return plan


class _Problems(Exception):
    pass


class Namer:
    """Names unique within the scratch schema, at most 63 bytes; the manifest's is reserved."""

    def __init__(self) -> None:
        self.used: set[str] = {MANIFEST_TABLE}

    def take(self, wanted: str) -> str:
        name = wanted
        counter = 0
        while name in self.used or len(name.encode()) > _MAX_IDENTIFIER:
            counter += 1
            suffix = f"_{hashlib.sha256(wanted.encode()).hexdigest()[:6]}{counter}"
            name = _truncate(wanted, _MAX_IDENTIFIER - len(suffix)) + suffix
        self.used.add(name)
        return name


def _truncate(text: str, limit: int) -> str:
    while len(text.encode()) > limit:
        text = text[:-1]
    return text


def type_chain(catalog: Catalog, oid: int) -> list[TypeInfo]:
    """The type and every type it is built from (domain base, array element, range subtype)."""
    chain: list[TypeInfo] = []
    todo = [oid]
    while todo:
        info = catalog.types[todo.pop()]
        if info in chain:
            continue
        chain.append(info)
        todo += [
            o
            for o in (info.base, info.element if info.is_array else 0, info.range_subtype or 0)
            if o
        ]
    return chain


def uses_copied_type(catalog: Catalog, column: Column) -> bool:
    return any(t.copied for t in type_chain(catalog, column.type_oid))


def _uncopyable_types(catalog: Catalog) -> list[str]:
    problems = []
    for table in catalog.tables:
        for column in table.columns:
            for info in type_chain(catalog, column.type_oid):
                if (
                    info.schema in ("pg_catalog", "information_schema")
                    or info.extension
                    or info.copied
                    or info.is_array
                ):
                    continue
                problems.append(
                    f"column {table.qualified}.{column.name} has type {info.qualified} "
                    f"(kind {info.kind!r}), which the dump cannot carry: only enums and domains "
                    "of the application and types of extensions can be copied"
                )
    return problems


def _name_clashes(catalog: Catalog) -> list[str]:
    """Copied types and sequences keep their names in the scratch schema, so two of the
    same name from different schemas cannot both be copied."""
    problems = []
    seen: dict[str, str] = {}
    shared = [s for s in catalog.sequences if s.owner is None]
    for qualified, name in [(t.qualified, t.name) for t in catalog.copied_types] + [
        (f"{s.schema}.{s.name}", s.name) for s in shared
    ]:
        if name == MANIFEST_TABLE:
            problems.append(f"{qualified} has the name {name!r}, which the dump's manifest takes")
        elif name in seen and seen[name] != qualified:
            problems.append(f"{seen[name]} and {qualified} share the name {name!r} in the copy")
        seen[name] = qualified
    return problems


def _table_plan(catalog: Catalog, table: Table, scratch_name: str) -> TablePlan:
    if table.entry.structure_only:
        columns = [ColumnPlan(c, None, None, NO_ROWS) for c in table.columns]
        return TablePlan(table, scratch_name, columns, table.primary_key, ROW_NUMBER)
    taken = {c.name for c in table.columns}
    row_number = ROW_NUMBER
    while row_number in taken:
        row_number += "_"
    n = sql.Identifier("s", row_number)

    def type_ref(info: TypeInfo) -> sql.Composable:
        return as_sql(info.type_sql)

    problems = []
    columns = []
    for column in table.columns:
        source = sql.Identifier("s", column.name)
        where = f"column {table.qualified}.{column.name} of type {column.type_sql}"
        value = table.entry.set_value(column.name)
        pseudonymised = column.name in table.entry.pseudonymise
        if column.generated:
            if value is not None or pseudonymised:
                problems.append(
                    f"{where} is generated: the server computes it, so it cannot be set or "
                    "pseudonymised; remove it from the allow list entry"
                )
                continue
            columns.append(ColumnPlan(column, None, None, GENERATED))
        elif column.kept:
            expression: sql.Composable = source
            if uses_copied_type(catalog, column):
                expression = sql.SQL("{}::text::{}").format(source, as_sql(column.type_sql))
            columns.append(ColumnPlan(column, expression, None, KEPT))
        else:
            try:
                if value is not None:
                    action, replaced = SET, _set_expression(table, column, value, n)
                elif pseudonymised:
                    action = PSEUDONYMISED
                    replaced = pseudonym.pseudonym(
                        source, column.type_oid, column.typmod, catalog.types
                    )
                else:
                    action = FAKED
                    target = Target(table.qualified, column.name, table.is_unique(column))
                    replaced = fake(
                        target, column.type_oid, column.typmod, catalog.types, type_ref, n
                    )
            except _Problems as exc:
                problems += exc.args[0]
                continue
            except Unfakeable as exc:
                problems.append(
                    f"{where} is pseudonymised but {exc}"
                    if pseudonymised
                    else f"{where} is not in the allow list and cannot be faked ({exc}); keep "
                    "it, set it, or leave the table out"
                )
                continue
            whole = _unless_null(column, source, replaced)
            columns.append(ColumnPlan(column, whole, whole, action, value))
    if problems:
        raise _Problems(problems)
    return TablePlan(table, scratch_name, columns, table.primary_key, row_number)


def _unless_null(column: Column, source: sql.Composable, value: sql.Composable) -> sql.Composable:
    """NULL stays NULL (SPEC §4)."""
    if column.not_null:
        return value
    return sql.SQL("CASE WHEN {} IS NULL THEN NULL ELSE {} END").format(source, value)


def _set_expression(
    table: Table, column: Column, value: SetValue, n: sql.Composable
) -> sql.Composable:
    """The value cast to the column's type by the server; `{n}` becomes the row number."""
    where = f"column {table.qualified}.{column.name} (entry {table.entry.key!r})"
    if value.text is None:
        if column.not_null:
            raise _Problems([f"{where} is NOT NULL, so it cannot be set to null"])
        return sql.SQL("NULL::{}").format(as_sql(column.type_sql))
    if table.is_unique(column) and not value.numbered:
        raise _Problems(
            [
                f"{where} is unique, so one value for every row ({_json_text(value)}) would "
                f"break it: put {SET_ROW_NUMBER} in the value for the row's number, or let it "
                "be faked"
            ]
        )
    text: sql.Composable = sql.Literal(value.text)
    if value.numbered:
        text = sql.SQL("replace({}, {}, {}::text)").format(text, sql.Literal(SET_ROW_NUMBER), n)
    return sql.SQL("CAST({} AS {})").format(text, as_sql(column.type_sql))


def _json_text(value: SetValue) -> str:
    return json.dumps(value.raw, ensure_ascii=False)


def _foreign_key(plan: Plan, tp: TablePlan, con: Constraint) -> ForeignKey:
    table = tp.table
    ref = plan.scratch_table(con.ref_table)
    if ref is None:
        return ForeignKey(table, con, False, "it points to a table that is not copied")
    if tp.structure_only:
        return ForeignKey(table, con, True, "")  # no rows: it holds whatever it points to
    if ref.structure_only:
        return ForeignKey(
            table, con, False, f"it points to {ref.table.qualified}, which is copied without rows"
        )
    replaced = []
    for attnum, ref_attnum in zip(con.columns, con.ref_columns, strict=True):
        mine, theirs = _column_plan(tp, attnum), _column_plan(ref, ref_attnum)
        if mine.action == KEPT and theirs.action == KEPT:
            continue
        if _same_pseudonyms(mine, theirs):
            continue  # equal originals, equal pseudonyms: the reference still holds
        replaced += [c.column.name for c in (mine, theirs) if c.action != KEPT]
    if replaced:
        return ForeignKey(table, con, False, f"faked column(s) {', '.join(replaced)}")
    return ForeignKey(table, con, True, "")


def _column_plan(tp: TablePlan, attnum: int) -> ColumnPlan:
    return next(c for c in tp.columns if c.column.attnum == attnum)


def _same_pseudonyms(a: ColumnPlan, b: ColumnPlan) -> bool:
    return (
        a.action == PSEUDONYMISED
        and b.action == PSEUDONYMISED
        and (a.column.type_oid, a.column.typmod) == (b.column.type_oid, b.column.typmod)
    )


def validate(conn: psycopg.Connection[Any], plan: Plan) -> None:
    """Ask the server whether every `set` value fits its column: the cast to the column's
    type (with its domain's CHECKs) and the table's CHECKs on set columns only. Runs before
    any write; a CHECK that also reads other columns is met during the copy (exit 3 too)."""
    problems: list[str] = []
    for tp in plan.tables:
        values = {c.column.attnum: c for c in tp.columns if c.value is not None}
        if not values:
            continue
        casts: dict[int, sql.Composable] = {}
        for attnum, cp in values.items():
            assert cp.value is not None
            cast = sql.SQL("CAST({} AS {})").format(
                sql.Literal(cp.value.sample()), as_sql(cp.column.type_sql)
            )
            where = f"{tp.table.qualified}.{cp.column.name}"
            if _fails(conn, sql.SQL("SELECT {}").format(cast), problems, where, cp.value):
                continue
            casts[attnum] = cast
        for con in tp.table.constraints:
            if con.kind != "c" or not con.columns or not set(con.columns) <= set(casts):
                continue
            row = sql.SQL(", ").join(
                sql.SQL("{} AS {}").format(casts[a], sql.Identifier(tp.table.column(a).name))
                for a in con.columns
            )
            query = sql.SQL("SELECT ({}) IS NOT FALSE FROM (SELECT {}) AS s").format(
                as_sql(_check_expression(con.definition)), row
            )
            names = ", ".join(tp.table.column(a).name for a in con.columns)
            where = f"{tp.table.qualified}.{names}"
            try:
                with conn.transaction():
                    ok = conn.execute(query).fetchone()
            except psycopg.Error as exc:
                problems.append(f"{where}: cannot evaluate {con.name} on the set value: {exc}")
                continue
            if not ok or not ok[0]:
                problems.append(
                    f"{where}: the set value is rejected by {con.name} ({con.definition})"
                )
    if problems:
        raise AllowListMismatch("a set value does not fit its column: " + "; ".join(problems))


def _fails(
    conn: psycopg.Connection[Any],
    query: sql.Composed,
    problems: list[str],
    where: str,
    value: SetValue,
) -> bool:
    try:
        with conn.transaction():
            conn.execute(query)
    except psycopg.Error as exc:
        message = exc.diag.message_primary or str(exc)
        problems.append(f"{where}: {_json_text(value)} does not fit ({message})")
        return True
    return False


def _check_expression(definition: str) -> str:
    """`CHECK ((a > 0)) NOT VALID` -> `((a > 0))`."""
    text = definition.removeprefix("CHECK ")
    for suffix in (" NOT VALID", " NO INHERIT"):
        text = text.removesuffix(suffix)
    return text


def simple_nextval(default_sql: str | None) -> bool:
    return default_sql is not None and bool(_SIMPLE_NEXTVAL.match(default_sql))
