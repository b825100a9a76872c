"""The copy's structure as SQL statements, for wherever the copy goes.

The same types, sequences, tables, CHECKs, indexes and foreign keys are built either in
the scratch schema of the source (under scratch names) or in a scratch database (under
their original schemas and names). A `Placement` says where each object goes; everything
else is shared. Expressions come deparsed from the source with the source schemas on
`search_path`, so names of copied objects print unqualified and resolve to the copies when
the statements run with the placement's `search_path`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from psycopg import errors as pgerrors
from psycopg import sql

from app.catalog import Catalog, Column, Constraint, SequenceInfo, Table, TypeInfo, as_sql
from app.errors import AllowListMismatch, DatabaseError
from app.plan import ForeignKey, Plan, TablePlan, simple_nextval

_ACTIONS = {"a": "NO ACTION", "r": "RESTRICT", "c": "CASCADE", "n": "SET NULL", "d": "SET DEFAULT"}
_MATCH = {"f": "MATCH FULL", "p": "MATCH PARTIAL", "s": ""}


class Placement(Protocol):
    """Where each copied object goes, and the path its deparsed expressions resolve on."""

    def search_path(self, catalog: Catalog) -> str:
        """The `search_path` value, names quoted, under which the statements run."""
        ...

    def table(self, tp: TablePlan) -> tuple[str, str]:
        """(schema, name) of the copy of a table."""
        ...

    def type(self, info: TypeInfo) -> sql.Identifier: ...

    def shared_sequence(self, seq: SequenceInfo) -> sql.Identifier: ...

    def owned_sequence(self, tp: TablePlan, column: Column) -> sql.Identifier: ...

    def index_name(self, name: str) -> str:
        """Indexes and the constraints backed by one live in the table's schema."""
        ...


class InScratchSchema:
    """Every object in one schema of the source: tables under their scratch names, index
    and sequence names made unique within that schema."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.schema = plan.scratch_schema

    def search_path(self, catalog: Catalog) -> str:
        path = [self.schema] + [schema for _, schema in catalog.extensions] + ["pg_catalog"]
        return ", ".join(sql.Identifier(p).as_string(None) for p in dict.fromkeys(path))

    def table(self, tp: TablePlan) -> tuple[str, str]:
        return (self.schema, tp.scratch_name)

    def type(self, info: TypeInfo) -> sql.Identifier:
        return sql.Identifier(self.schema, info.name)

    def shared_sequence(self, seq: SequenceInfo) -> sql.Identifier:
        self.plan.names.used.add(seq.name)
        return sql.Identifier(self.schema, seq.name)

    def owned_sequence(self, tp: TablePlan, column: Column) -> sql.Identifier:
        return sql.Identifier(
            self.schema, self.plan.names.take(f"{tp.scratch_name}_{column.name}_seq")
        )

    def index_name(self, name: str) -> str:
        return self.plan.names.take(name)


class UnderOriginalNames:
    """Every object under its original schema and name, in a database of its own: the dump
    restores with no renaming."""

    def search_path(self, catalog: Catalog) -> str:
        """The path the source's expressions were deparsed under: they resolve the same."""
        return catalog.search_path

    def table(self, tp: TablePlan) -> tuple[str, str]:
        return (tp.table.schema, tp.table.name)

    def type(self, info: TypeInfo) -> sql.Identifier:
        return sql.Identifier(info.schema, info.name)

    def shared_sequence(self, seq: SequenceInfo) -> sql.Identifier:
        return sql.Identifier(seq.schema, seq.name)

    def owned_sequence(self, tp: TablePlan, column: Column) -> sql.Identifier:
        assert column.sequence is not None
        return sql.Identifier(column.sequence.schema, column.sequence.name)

    def index_name(self, name: str) -> str:
        return name


@dataclass(frozen=True)
class Chunk:
    """Rows `after` < n <= `last` (no upper bound when None) of a table numbered in
    primary key order; the bounds are estimates, the slices between them exact."""

    after: int
    last: int | None


def table_ident(place: Placement, tp: TablePlan) -> sql.Identifier:
    return sql.Identifier(*place.table(tp))


# -- types and sequences -------------------------------------------------------------------


def create_types(catalog: Catalog, place: Placement) -> list[sql.Composed]:
    """Enums first, then domains after the domains they are built on."""
    return [_create_type(info, place.type(info)) for info in _in_dependency_order(catalog)]


def _create_type(info: TypeInfo, name: sql.Identifier) -> sql.Composed:
    if info.kind == "e":
        labels = sql.SQL(", ").join(sql.Literal(label) for label in info.labels)
        return sql.SQL("CREATE TYPE {} AS ENUM ({})").format(name, labels)
    parts: list[sql.Composable] = [
        sql.SQL("CREATE DOMAIN {} AS {}").format(name, as_sql(info.base_sql))
    ]
    if info.collation:
        parts.append(sql.SQL("COLLATE {}").format(as_sql(info.collation)))
    if info.default_sql is not None:
        parts.append(sql.SQL("DEFAULT {}").format(as_sql(info.default_sql)))
    if info.not_null:
        parts.append(sql.SQL("NOT NULL"))
    for con_name, definition in info.checks:
        parts.append(
            sql.SQL("CONSTRAINT {} {}").format(sql.Identifier(con_name), as_sql(definition))
        )
    return sql.SQL(" ").join(parts)


def shared_sequences(
    catalog: Catalog, place: Placement
) -> list[tuple[SequenceInfo, sql.Identifier, sql.Composed]]:
    """Sequences a default uses without owning (serials get their own, by table): the
    source sequence, its copy, and the statement that creates the copy."""
    result = []
    for seq in catalog.sequences:
        if seq.owner is not None:
            continue
        name = place.shared_sequence(seq)
        result.append((seq, name, create_sequence(name, seq)))
    return result


def create_sequence(name: sql.Identifier, seq: SequenceInfo) -> sql.Composed:
    return sql.SQL(
        "CREATE SEQUENCE {} AS {} INCREMENT BY {} MINVALUE {} MAXVALUE {} START WITH {} {}"
    ).format(
        name,
        as_sql(seq.type_sql),
        sql.Literal(seq.increment),
        sql.Literal(seq.minimum),
        sql.Literal(seq.maximum),
        sql.Literal(seq.start),
        sql.SQL("CYCLE" if seq.cycle else "NO CYCLE"),
    )


# -- tables ----------------------------------------------------------------------------------


def create_table(tp: TablePlan, place: Placement, *, unlogged: bool = False) -> list[sql.Composed]:
    """Its serial sequences, the table with its columns and validated CHECKs, and the
    sequences' OWNED BY; no index yet (they are built after the load). An UNLOGGED table
    (and its identity sequence) writes no WAL."""
    schema, name = place.table(tp)
    table = sql.Identifier(schema, name)
    statements: list[sql.Composed] = []
    owned: list[tuple[sql.Identifier, Column]] = []
    definitions: list[sql.Composable] = []
    for cp in tp.columns:
        column = cp.column
        parts: list[sql.Composable] = [sql.Identifier(column.name), as_sql(column.type_sql)]
        if column.collation:
            parts.append(sql.SQL("COLLATE {}").format(as_sql(column.collation)))
        if column.generated:
            kind = "STORED" if column.generated == "s" else "VIRTUAL"
            parts.append(
                sql.SQL("GENERATED ALWAYS AS ({}) {}").format(
                    as_sql(column.default_sql or ""), sql.SQL(kind)
                )
            )
        elif column.identity:
            always = "ALWAYS" if column.identity == "a" else "BY DEFAULT"
            parts.append(sql.SQL("GENERATED {} AS IDENTITY").format(sql.SQL(always)))
        elif column.sequence and column.sequence.owner and simple_nextval(column.default_sql):
            seq = place.owned_sequence(tp, column)
            statements.append(create_sequence(seq, column.sequence))
            owned.append((seq, column))
            parts.append(
                sql.SQL("DEFAULT nextval({}::regclass)").format(sql.Literal(seq.as_string(None)))
            )
        elif column.default_sql is not None:
            parts.append(sql.SQL("DEFAULT {}").format(as_sql(column.default_sql)))
        if column.not_null:
            parts.append(sql.SQL("NOT NULL"))
        definitions.append(sql.SQL(" ").join(parts))
    for con in tp.table.constraints:
        if con.kind == "c" and con.validated:
            definitions.append(_constraint(con))
    statements.append(
        sql.SQL("CREATE {}TABLE {} ({})").format(
            sql.SQL("UNLOGGED " if unlogged else ""), table, sql.SQL(", ").join(definitions)
        )
    )
    for seq, column in owned:
        statements.append(
            sql.SQL("ALTER SEQUENCE {} OWNED BY {}").format(
                seq, sql.Identifier(schema, name, column.name)
            )
        )
    return statements


def select_rows(tp: TablePlan, rows: Chunk | None = None) -> sql.Composed:
    """The rows to copy, as the source computes them: kept columns verbatim, every other
    column its fake. Only these values ever leave the source table. A structure-only table
    has none: its callers copy nothing.

    `rows` keeps one slice of the rows numbered in primary key order, so that several
    statements can copy one table between them with the very numbers, and fakes, that one
    statement gives."""
    assert not tp.structure_only, f"{tp.table.qualified} is copied without rows"
    inserted = [c for c in tp.columns if c.expression is not None]
    source = sql.SQL("{}{}").format(
        sql.SQL("ONLY ") if tp.table.relkind == "r" else sql.SQL(""),
        sql.Identifier(tp.table.schema, tp.table.name),
    )
    needed = sql.SQL(", ").join(sql.Identifier(c.column.name) for c in inserted)
    where: sql.Composable = sql.SQL("")
    if tp.needs_row_number or rows is not None:
        key = sql.SQL(", ").join(sql.Identifier(c) for c in tp.order_by)
        order = sql.SQL("ORDER BY {}").format(key) if tp.order_by else sql.SQL("")
        number = sql.SQL("row_number() OVER ({})").format(order)
        if rows is not None:
            assert tp.order_by, f"{tp.table.qualified} has no key to slice by"
            number = sql.SQL("{} + {}").format(sql.Literal(rows.after), number)
            where = _slice(tp, source, key, rows)
        needed = sql.SQL("{}, {} AS {}").format(needed, number, sql.Identifier(tp.row_number))
    return sql.SQL("SELECT {values} FROM (SELECT {needed} FROM {source}{where}) AS s").format(
        values=sql.SQL(", ").join(c.expression for c in inserted if c.expression),
        needed=needed,
        source=source,
        where=where,
    )


def _slice(
    tp: TablePlan, source: sql.Composable, key: sql.Composable, rows: Chunk
) -> sql.Composable:
    """The key range of rows `after` + 1 to `last` in key order, found by the statement
    itself (so in its own snapshot) on the primary key's index: above the key of row
    `after`, and up to the key of row `last` or, when the table has fewer rows than the
    estimate said, up to its largest key."""
    nth = sql.SQL("SELECT {key} FROM {source} ORDER BY {key} OFFSET {skip} LIMIT 1")
    bounds = []
    if rows.after:
        bounds.append(
            sql.SQL("({key}) > ({nth})").format(
                key=key, nth=nth.format(key=key, source=source, skip=sql.Literal(rows.after - 1))
            )
        )
    if rows.last is not None:
        rank = sql.Identifier(tp.row_number)
        descending = sql.SQL(", ").join(
            sql.SQL("{} DESC").format(sql.Identifier(c)) for c in tp.order_by
        )
        bounds.append(
            sql.SQL(
                "({key}) <= (SELECT {key} FROM ((SELECT 1 AS {rank}, {key} FROM {source} "
                "ORDER BY {key} OFFSET {skip} LIMIT 1) UNION ALL (SELECT 2, {key} FROM {source} "
                "ORDER BY {descending} LIMIT 1)) AS b ORDER BY {rank} LIMIT 1)"
            ).format(
                key=key,
                rank=rank,
                source=source,
                skip=sql.Literal(rows.last - 1),
                descending=descending,
            )
        )
    if not bounds:
        return sql.SQL("")
    return sql.SQL(" WHERE {}").format(sql.SQL(" AND ").join(bounds))


def inserted_columns(tp: TablePlan) -> list[Column]:
    """Every column but the generated ones, which the target recomputes."""
    return [c.column for c in tp.columns if c.expression is not None]


def column_list(tp: TablePlan) -> sql.Composable:
    return sql.SQL(", ").join(sql.Identifier(c.name) for c in inserted_columns(tp))


def insert_rows(tp: TablePlan, place: Placement, rows: Chunk | None = None) -> sql.Composed:
    """One INSERT ... SELECT, for a copy inside the source database."""
    overriding = (
        sql.SQL(" OVERRIDING SYSTEM VALUE")
        if any(c.identity == "a" for c in inserted_columns(tp))
        else sql.SQL("")
    )
    return sql.SQL("INSERT INTO {target} ({columns}){overriding} {select}").format(
        target=table_ident(place, tp),
        columns=column_list(tp),
        overriding=overriding,
        select=select_rows(tp, rows),
    )


def continue_sequences(tp: TablePlan, place: Placement) -> list[tuple[sql.Composed, list[str]]]:
    """Serial and identity sequences continue after the largest copied value."""
    table = table_ident(place, tp)
    name = table.as_string(None)
    statements = []
    for cp in tp.columns:
        column = cp.column
        if not (column.identity or (column.sequence and column.sequence.owner)):
            continue
        statements.append(
            (
                sql.SQL(
                    "SELECT setval(pg_get_serial_sequence(%s, %s), max({col})) FROM {table} "
                    "HAVING max({col}) IS NOT NULL"
                ).format(col=sql.Identifier(column.name), table=table),
                [name, column.name],
            )
        )
    return statements


def index(tp: TablePlan, place: Placement) -> list[sql.Composed]:
    """Primary keys, unique constraints, unvalidated CHECKs and indexes, built after the load.

    The name each index gets is kept in `tp.index_names`, for the manifest."""
    table = table_ident(place, tp)
    statements: list[sql.Composed] = []
    for con in tp.table.constraints:
        if con.kind in "pux":
            tp.index_names[con.name] = place.index_name(con.name)
            statements.append(
                sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                    table, sql.Identifier(tp.index_names[con.name]), as_sql(con.definition)
                )
            )
        elif con.kind == "c" and not con.validated:
            statements.append(sql.SQL("ALTER TABLE {} ADD {}").format(table, _constraint(con)))
    for ix in tp.table.indexes:
        if ix.of_constraint:
            continue
        tp.index_names[ix.name] = place.index_name(ix.name)
        statements.append(
            sql.SQL("CREATE {}INDEX {} ON {} {}").format(
                sql.SQL("UNIQUE ") if ix.unique else sql.SQL(""),
                sql.Identifier(tp.index_names[ix.name]),
                table,
                as_sql(ix.method_sql),
            )
        )
    return statements


def foreign_key(
    plan: Plan, tp: TablePlan, fk: ForeignKey, place: Placement, *, not_valid: bool = False
) -> sql.Composed:
    """The foreign key; `not_valid` skips checking the rows already there."""
    con = fk.constraint
    ref = plan.scratch_table(con.ref_table)
    assert ref is not None

    def names(t: Table, attnums: tuple[int, ...]) -> sql.Composable:
        return sql.SQL(", ").join(sql.Identifier(t.column(a).name) for a in attnums)

    clauses = [
        sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} FOREIGN KEY ({}) REFERENCES {} ({})").format(
            table_ident(place, tp),
            sql.Identifier(con.name),
            names(tp.table, con.columns),
            table_ident(place, ref),
            names(ref.table, con.ref_columns),
        ),
        sql.SQL(_MATCH[con.match]),
        sql.SQL("ON UPDATE " + _ACTIONS[con.on_update]),
        sql.SQL("ON DELETE " + _ACTIONS[con.on_delete]),
    ]
    if con.deferrable:
        clauses.append(sql.SQL("DEFERRABLE INITIALLY DEFERRED" if con.deferred else "DEFERRABLE"))
    if not_valid:
        clauses.append(sql.SQL("NOT VALID"))
    return sql.SQL(" ").join(c for c in clauses if c.as_string(None))


@contextmanager
def explained(table: Table, doing: str) -> Iterator[None]:
    """Turn a server error about a fake into one that names the table and the fix."""
    try:
        yield
    except (pgerrors.CheckViolation, pgerrors.NotNullViolation) as exc:
        constraint = exc.diag.constraint_name or "a constraint"
        raise AllowListMismatch(
            f"{doing} {table.qualified}: {constraint} rejects a fake or set value "
            f"({exc.diag.message_primary}); keep the column it checks in the allow list, "
            "set it to a value the constraint accepts, or leave the table out"
        ) from None
    except pgerrors.UniqueViolation as exc:
        raise AllowListMismatch(
            f"{doing} {table.qualified}: {exc.diag.constraint_name} is unique but the fakes "
            f"are not ({exc.diag.message_primary}): the column is too short for that many "
            "distinct fakes; keep it in the allow list or leave the table out"
        ) from None
    except (
        pgerrors.StringDataRightTruncation,
        pgerrors.NumericValueOutOfRange,
        pgerrors.DatetimeFieldOverflow,
        pgerrors.InvalidTextRepresentation,
    ) as exc:
        raise AllowListMismatch(
            f"{doing} {table.qualified}: a fake or set value does not fit its column "
            f"({exc.diag.message_primary}); keep the column in the allow list or set it to a "
            "value that fits"
        ) from None
    except pgerrors.ForeignKeyViolation as exc:
        raise DatabaseError(
            f"{doing} {table.qualified}: foreign key {exc.diag.constraint_name} does not hold "
            f"in the copy ({exc.diag.message_primary})"
        ) from None


def _constraint(con: Constraint) -> sql.Composed:
    return sql.SQL("CONSTRAINT {} {}").format(sql.Identifier(con.name), as_sql(con.definition))


def _in_dependency_order(catalog: Catalog) -> list[TypeInfo]:
    """Enums first, then domains after the domains they are built on."""
    types = catalog.copied_types
    by_oid = {t.oid: t for t in types}
    done: list[TypeInfo] = []

    def visit(info: TypeInfo) -> None:
        if info in done:
            return
        for oid in (info.base, info.element):
            if oid in by_oid:
                visit(by_oid[oid])
        done.append(info)

    for info in sorted(types, key=lambda t: (t.kind != "e", t.schema, t.name)):
        visit(info)
    return done
