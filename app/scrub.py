"""The scratch schema on the source: created, filled and indexed in one transaction.

The whole copy is one REPEATABLE READ transaction, so every table comes from the same
snapshot, and a failure or a lost connection rolls everything back: nothing half-built is
ever visible. It is committed only so that pg_dump can see it, and dropped afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import errors as pgerrors
from psycopg import sql

from app import pseudonym
from app.catalog import Column, Constraint, SequenceInfo, Table, TypeInfo, as_sql
from app.errors import AllowListMismatch, ConfigError, DatabaseError
from app.log import log
from app.plan import Plan, TablePlan, simple_nextval

MARKER = "sanitised-dump scratch schema: dropped after every run, safe to drop"

# Objects in the scratch schema that still depend on an object of another schema (other
# than pg_catalog and extensions): the dump would not restore into an empty database.
FOREIGN_DEPENDENCIES = """
WITH scratch(classid, objid) AS (
    SELECT 'pg_class'::regclass, c.oid FROM pg_class c WHERE c.relnamespace = %(ns)s
  UNION ALL
    SELECT 'pg_type'::regclass, t.oid FROM pg_type t WHERE t.typnamespace = %(ns)s
  UNION ALL
    SELECT 'pg_attrdef'::regclass, d.oid FROM pg_attrdef d
    JOIN pg_class c ON c.oid = d.adrelid WHERE c.relnamespace = %(ns)s
  UNION ALL
    SELECT 'pg_constraint'::regclass, k.oid FROM pg_constraint k WHERE k.connamespace = %(ns)s
)
SELECT DISTINCT pg_describe_object(d.classid, d.objid, d.objsubid) AS object,
       pg_describe_object(d.refclassid, d.refobjid, d.refobjsubid) AS needs
FROM scratch s
JOIN pg_depend d ON d.classid = s.classid AND d.objid = s.objid AND d.deptype = 'n'
CROSS JOIN LATERAL pg_identify_object(d.refclassid, d.refobjid, 0) r
WHERE r.schema IS NOT NULL AND r.schema NOT IN ('pg_catalog', 'information_schema')
  AND r.schema <> %(name)s
  AND NOT EXISTS (SELECT 1 FROM pg_depend e WHERE e.classid = d.refclassid
                   AND e.objid = d.refobjid AND e.deptype = 'e')
ORDER BY 1, 2
"""

_ACTIONS = {"a": "NO ACTION", "r": "RESTRICT", "c": "CASCADE", "n": "SET NULL", "d": "SET DEFAULT"}
_MATCH = {"f": "MATCH FULL", "p": "MATCH PARTIAL", "s": ""}


@dataclass(frozen=True)
class TableResult:
    table: str
    scratch_name: str
    rows: int
    kept: list[str]
    faked: list[str]
    seconds: float
    set_columns: list[str]
    pseudonymised: list[str]
    structure_only: bool


class ScratchSchema:
    """Builds the copy in a schema of the source database, inside the open transaction."""

    def __init__(
        self, conn: psycopg.Connection[Any], plan: Plan, pseudonym_key: str | None = None
    ) -> None:
        self.conn = conn
        self.plan = plan
        self.schema = plan.scratch_schema
        self.pseudonym_key = pseudonym_key

    def ident(self, *name: str) -> sql.Identifier:
        return sql.Identifier(self.schema, *name)

    def build(self) -> list[TableResult]:
        """Create, fill and index every table; the caller commits."""
        catalog = self.plan.catalog
        conn = self.conn
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(self.schema)))
        conn.execute(
            sql.SQL("COMMENT ON SCHEMA {} IS {}").format(
                sql.Identifier(self.schema), sql.Literal(MARKER)
            )
        )
        path = [self.schema] + [schema for _, schema in catalog.extensions] + ["pg_catalog"]
        conn.execute(
            "SELECT set_config('search_path', %s, true)",
            [", ".join(sql.Identifier(p).as_string(conn) for p in dict.fromkeys(path))],
        )
        for info in _in_dependency_order(catalog.copied_types):
            self._create_type(info)
        self._create_shared_sequences()
        for tp in self.plan.tables:
            self._create_table(tp)
        self._check_self_contained()
        if self.plan.needs_pseudonym_key:
            if not self.pseudonym_key:
                raise ConfigError("the allow list pseudonymises columns: set PSEUDONYM_KEY")
            pseudonym.install_key(self.conn, self.pseudonym_key)
        results = [self._copy(tp) for tp in self.plan.tables]
        for tp in self.plan.tables:
            self._index(tp)
        for tp in self.plan.tables:
            for fk in tp.foreign_keys:
                if fk.kept:
                    self._add_foreign_key(tp, fk.constraint)
                else:
                    log.warning(
                        "foreign key left out",
                        extra={"foreign_key": fk.describe(catalog), "reason": fk.reason},
                    )
        return results

    def drop(self) -> None:
        self.conn.execute(
            sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.schema))
        )

    # -- types and sequences -------------------------------------------------------------

    def _create_type(self, info: TypeInfo) -> None:
        name = self.ident(info.name)
        if info.kind == "e":
            labels = sql.SQL(", ").join(sql.Literal(label) for label in info.labels)
            self.conn.execute(sql.SQL("CREATE TYPE {} AS ENUM ({})").format(name, labels))
            return
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
        self.conn.execute(sql.SQL(" ").join(parts))

    def _create_shared_sequences(self) -> None:
        """Sequences a default uses without owning (serials get their own, by table)."""
        for seq in self.plan.catalog.sequences:
            if seq.owner is not None:
                continue
            self.plan.names.used.add(seq.name)
            self.conn.execute(_create_sequence(self.ident(seq.name), seq))
            row = self.conn.execute(
                sql.SQL("SELECT last_value, is_called FROM {}").format(
                    sql.Identifier(seq.schema, seq.name)
                )
            ).fetchone()
            assert row is not None
            self.conn.execute(
                "SELECT setval(%s::regclass, %s, %s)",
                [self.ident(seq.name).as_string(self.conn), row[0], row[1]],
            )

    # -- tables ----------------------------------------------------------------------------

    def _create_table(self, tp: TablePlan) -> None:
        table = self.ident(tp.scratch_name)
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
                seq = self.ident(self.plan.names.take(f"{tp.scratch_name}_{column.name}_seq"))
                self.conn.execute(_create_sequence(seq, column.sequence))
                owned.append((seq, column))
                parts.append(
                    sql.SQL("DEFAULT nextval({}::regclass)").format(
                        sql.Literal(seq.as_string(self.conn))
                    )
                )
            elif column.default_sql is not None:
                parts.append(sql.SQL("DEFAULT {}").format(as_sql(column.default_sql)))
            if column.not_null:
                parts.append(sql.SQL("NOT NULL"))
            definitions.append(sql.SQL(" ").join(parts))
        for con in tp.table.constraints:
            if con.kind == "c" and con.validated:
                definitions.append(_constraint(con))
        self.conn.execute(
            sql.SQL("CREATE TABLE {} ({})").format(table, sql.SQL(", ").join(definitions))
        )
        for seq, column in owned:
            self.conn.execute(
                sql.SQL("ALTER SEQUENCE {} OWNED BY {}").format(
                    seq, self.ident(tp.scratch_name, column.name)
                )
            )

    def _check_self_contained(self) -> None:
        rows = self.conn.execute(
            FOREIGN_DEPENDENCIES,
            {"ns": _namespace_oid(self.conn, self.schema), "name": self.schema},
        ).fetchall()
        if rows:
            raise AllowListMismatch(
                "the copy would depend on objects outside the dump: "
                + "; ".join(f"{obj} needs {needs}" for obj, needs in rows)
            )

    def _copy(self, tp: TablePlan) -> TableResult:
        started = time.monotonic()
        rows = 0 if tp.structure_only else self._insert(tp)
        result = TableResult(
            table=tp.table.qualified,
            scratch_name=tp.scratch_name,
            rows=rows,
            kept=tp.kept,
            faked=tp.faked,
            seconds=round(time.monotonic() - started, 3),
            set_columns=list(tp.set_values),
            pseudonymised=tp.pseudonymised,
            structure_only=tp.structure_only,
        )
        log.info(
            "table copied",
            extra={
                "table": result.table,
                "rows": result.rows,
                "kept": result.kept,
                "faked": result.faked,
                "set": result.set_columns,
                "pseudonymised": result.pseudonymised,
                "structure_only": result.structure_only,
                "seconds": result.seconds,
            },
        )
        return result

    def _insert(self, tp: TablePlan) -> int:
        inserted = [c for c in tp.columns if c.expression is not None]
        source = sql.Identifier(tp.table.schema, tp.table.name)
        only = sql.SQL("ONLY ") if tp.table.relkind == "r" else sql.SQL("")
        needed = sql.SQL(", ").join(sql.Identifier(c.column.name) for c in inserted)
        if tp.needs_row_number:
            order = (
                sql.SQL("ORDER BY {}").format(
                    sql.SQL(", ").join(sql.Identifier(c) for c in tp.order_by)
                )
                if tp.order_by
                else sql.SQL("")
            )
            needed = sql.SQL("{}, row_number() OVER ({}) AS {}").format(
                needed, order, sql.Identifier(tp.row_number)
            )
        overriding = (
            sql.SQL(" OVERRIDING SYSTEM VALUE")
            if any(c.column.identity == "a" for c in inserted)
            else sql.SQL("")
        )
        statement = sql.SQL(
            "INSERT INTO {target} ({columns}){overriding} SELECT {values} "
            "FROM (SELECT {needed} FROM {only}{source}) AS s"
        ).format(
            target=self.ident(tp.scratch_name),
            columns=sql.SQL(", ").join(sql.Identifier(c.column.name) for c in inserted),
            overriding=overriding,
            values=sql.SQL(", ").join(c.expression for c in inserted if c.expression),
            needed=needed,
            only=only,
            source=source,
        )
        with self._explained(tp.table, "copying"):
            rows = self.conn.execute(statement).rowcount
            self._continue_sequences(tp)
        return rows

    def _continue_sequences(self, tp: TablePlan) -> None:
        """Serial and identity sequences continue after the largest copied value."""
        name = self.ident(tp.scratch_name).as_string(self.conn)
        for cp in tp.columns:
            column = cp.column
            if not (column.identity or (column.sequence and column.sequence.owner)):
                continue
            self.conn.execute(
                sql.SQL(
                    "SELECT setval(pg_get_serial_sequence(%s, %s), max({col})) FROM {table} "
                    "HAVING max({col}) IS NOT NULL"
                ).format(col=sql.Identifier(column.name), table=self.ident(tp.scratch_name)),
                [name, column.name],
            )

    def _index(self, tp: TablePlan) -> None:
        """Primary keys, unique constraints and indexes, built after the load."""
        table = self.ident(tp.scratch_name)
        with self._explained(tp.table, "indexing"):
            for con in tp.table.constraints:
                if con.kind in "pux":
                    name = self.plan.names.take(con.name)
                    self.conn.execute(
                        sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                            table, sql.Identifier(name), as_sql(con.definition)
                        )
                    )
                elif con.kind == "c" and not con.validated:
                    self.conn.execute(
                        sql.SQL("ALTER TABLE {} ADD {}").format(table, _constraint(con))
                    )
            for index in tp.table.indexes:
                if index.of_constraint:
                    continue
                self.conn.execute(
                    sql.SQL("CREATE {}INDEX {} ON {} {}").format(
                        sql.SQL("UNIQUE ") if index.unique else sql.SQL(""),
                        sql.Identifier(self.plan.names.take(index.name)),
                        table,
                        as_sql(index.method_sql),
                    )
                )

    def _add_foreign_key(self, tp: TablePlan, con: Constraint) -> None:
        ref = self.plan.scratch_table(con.ref_table)
        assert ref is not None
        table = tp.table

        def names(t: Table, attnums: tuple[int, ...]) -> sql.Composable:
            return sql.SQL(", ").join(sql.Identifier(t.column(a).name) for a in attnums)

        clauses = [
            sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} FOREIGN KEY ({}) REFERENCES {} ({})").format(
                self.ident(tp.scratch_name),
                sql.Identifier(con.name),
                names(table, con.columns),
                self.ident(ref.scratch_name),
                names(ref.table, con.ref_columns),
            ),
            sql.SQL(_MATCH[con.match]),
            sql.SQL("ON UPDATE " + _ACTIONS[con.on_update]),
            sql.SQL("ON DELETE " + _ACTIONS[con.on_delete]),
        ]
        if con.deferrable:
            clauses.append(
                sql.SQL("DEFERRABLE INITIALLY DEFERRED" if con.deferred else "DEFERRABLE")
            )
        with self._explained(table, "adding foreign keys to"):
            self.conn.execute(sql.SQL(" ").join(c for c in clauses if c.as_string(None)))

    @contextmanager
    def _explained(self, table: Table, doing: str) -> Iterator[None]:
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
                f"({exc.diag.message_primary}); keep the column in the allow list or set "
                "it to a value that fits"
            ) from None
        except pgerrors.ForeignKeyViolation as exc:
            raise DatabaseError(
                f"{doing} {table.qualified}: foreign key {exc.diag.constraint_name} does not hold "
                f"in the copy ({exc.diag.message_primary})"
            ) from None


def drop_leftover(conn: psycopg.Connection[Any], schema: str) -> None:
    """Drop a scratch schema left by a killed run; refuse one this job did not make.

    Call only while holding the lock, so a running job's schema is never dropped."""
    row = conn.execute(
        "SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = %s",
        [schema],
    ).fetchone()
    if row is None:
        return
    if row[0] != MARKER:
        raise ConfigError(
            f"schema {schema!r} exists and was not made by this job: set SCRATCH_SCHEMA "
            "to a schema name that is not in use"
        )
    log.warning("dropping a leftover scratch schema", extra={"schema": schema})
    conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def _create_sequence(name: sql.Identifier, seq: SequenceInfo) -> sql.Composed:
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


def _constraint(con: Constraint) -> sql.Composed:
    return sql.SQL("CONSTRAINT {} {}").format(sql.Identifier(con.name), as_sql(con.definition))


def _namespace_oid(conn: psycopg.Connection[Any], name: str) -> int:
    row = conn.execute("SELECT oid FROM pg_namespace WHERE nspname = %s", [name]).fetchone()
    assert row is not None
    return int(row[0])


def _in_dependency_order(types: list[TypeInfo]) -> list[TypeInfo]:
    """Enums first, then domains after the domains they are built on."""
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
