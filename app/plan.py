"""What the copy will do, decided before anything is written.

For every listed table: the scratch name, each column kept or faked (and how), the
foreign keys that survive and those left out. `check` and `plan` print it; `scrub`
carries it out. Building it raises AllowListMismatch for everything that can be known
up front: unfakeable types, types or functions the dump could not carry, name clashes.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from psycopg import sql

from app.catalog import Catalog, Column, Constraint, Table, TypeInfo, as_sql
from app.errors import AllowListMismatch
from app.fakes import Target, Unfakeable, fake

ROW_NUMBER = "n"
# The manifest's table in the scratch schema: no copied table, index or sequence may take it.
MANIFEST_TABLE = "sanitised_dump_manifest"
_SIMPLE_NEXTVAL = re.compile(r"^nextval\('(?:[^']|'')+'::regclass\)$")
_MAX_IDENTIFIER = 63


@dataclass(frozen=True)
class ColumnPlan:
    column: Column
    expression: sql.Composable | None  # None: not inserted (generated)
    fake: sql.Composable | None  # the fake of a faked column, for reports


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
        return [c.column.name for c in self.columns if c.column.kept]

    @property
    def faked(self) -> list[str]:
        return [c.column.name for c in self.columns if c.fake is not None]

    @property
    def needs_row_number(self) -> bool:
        return any(c.fake is not None for c in self.columns)


@dataclass
class Plan:
    catalog: Catalog
    scratch_schema: str
    tables: list[TablePlan]
    names: Namer  # relation names taken in the scratch schema

    @property
    def left_out(self) -> list[ForeignKey]:
        return [fk for t in self.tables for fk in t.foreign_keys if not fk.kept]

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
        if column.generated:
            columns.append(ColumnPlan(column, None, None))
        elif column.kept:
            expression: sql.Composable = source
            if uses_copied_type(catalog, column):
                expression = sql.SQL("{}::text::{}").format(source, as_sql(column.type_sql))
            columns.append(ColumnPlan(column, expression, None))
        else:
            target = Target(table.qualified, column.name, table.is_unique(column))
            try:
                value = fake(target, column.type_oid, column.typmod, catalog.types, type_ref, n)
            except Unfakeable as exc:
                problems.append(
                    f"column {table.qualified}.{column.name} of type {column.type_sql} is not in "
                    f"the allow list and cannot be faked ({exc}); keep it or leave the table out"
                )
                continue
            if not column.not_null:
                value = sql.SQL("CASE WHEN {} IS NULL THEN NULL ELSE {} END").format(source, value)
            columns.append(ColumnPlan(column, value, value))
    if problems:
        raise _Problems(problems)
    return TablePlan(table, scratch_name, columns, table.primary_key, row_number)


def _foreign_key(plan: Plan, tp: TablePlan, con: Constraint) -> ForeignKey:
    table = tp.table
    ref = plan.scratch_table(con.ref_table)
    if ref is None:
        return ForeignKey(table, con, False, "it points to a table that is not copied")
    faked = [table.column(a).name for a in con.columns if not table.column(a).kept]
    faked += [ref.table.column(a).name for a in con.ref_columns if not ref.table.column(a).kept]
    if faked:
        return ForeignKey(table, con, False, f"faked column(s) {', '.join(faked)}")
    return ForeignKey(table, con, True, "")


def simple_nextval(default_sql: str | None) -> bool:
    return default_sql is not None and bool(_SIMPLE_NEXTVAL.match(default_sql))
