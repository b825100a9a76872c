"""The scratch schema on the source: created, filled and indexed in one transaction.

The whole copy is one REPEATABLE READ transaction, so every table comes from the same
snapshot, and a failure or a lost connection rolls everything back: nothing half-built is
ever visible. It is committed only so that pg_dump can see it, and dropped afterwards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from app import ddl, pseudonym
from app.errors import AllowListMismatch, ConfigError
from app.log import log
from app.plan import Plan, TablePlan

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
        self.place = ddl.InScratchSchema(plan)
        self.pseudonym_key = pseudonym_key

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
        conn.execute(
            "SELECT set_config('search_path', %s, true)", [self.place.search_path(catalog)]
        )
        for statement in ddl.create_types(catalog, self.place):
            conn.execute(statement)
        self._create_shared_sequences()
        for tp in self.plan.tables:
            for statement in ddl.create_table(tp, self.place):
                conn.execute(statement)
        self._check_self_contained()
        if self.plan.needs_pseudonym_key:
            if not self.pseudonym_key:
                raise ConfigError("the allow list pseudonymises columns: set PSEUDONYM_KEY")
            pseudonym.install_key(self.conn, self.pseudonym_key)
        results = [self._copy(tp) for tp in self.plan.tables]
        for tp in self.plan.tables:
            with ddl.explained(tp.table, "indexing"):
                for statement in ddl.index(tp, self.place):
                    conn.execute(statement)
        for tp in self.plan.tables:
            for fk in tp.foreign_keys:
                if fk.kept:
                    with ddl.explained(tp.table, "adding foreign keys to"):
                        conn.execute(ddl.foreign_key(self.plan, tp, fk, self.place))
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

    def _create_shared_sequences(self) -> None:
        """Sequences a default uses without owning, at the source's current value."""
        for seq, name, statement in ddl.shared_sequences(self.plan.catalog, self.place):
            self.conn.execute(statement)
            row = self.conn.execute(
                sql.SQL("SELECT last_value, is_called FROM {}").format(
                    sql.Identifier(seq.schema, seq.name)
                )
            ).fetchone()
            assert row is not None
            self.conn.execute(
                "SELECT setval(%s::regclass, %s, %s)",
                [name.as_string(self.conn), row[0], row[1]],
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
        if tp.structure_only:
            return table_copied(tp, 0, started)
        with ddl.explained(tp.table, "copying"):
            rows = self.conn.execute(ddl.insert_rows(tp, self.place)).rowcount
            for statement, params in ddl.continue_sequences(tp, self.place):
                self.conn.execute(statement, params)
        return table_copied(tp, rows, started)


def table_copied(tp: TablePlan, rows: int, started: float) -> TableResult:
    """The result of one table's copy, logged."""
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


def _namespace_oid(conn: psycopg.Connection[Any], name: str) -> int:
    row = conn.execute("SELECT oid FROM pg_namespace WHERE nspname = %s", [name]).fetchone()
    assert row is not None
    return int(row[0])
