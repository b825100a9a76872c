"""The scratch schema on the source: created, filled from one snapshot, indexed.

With one connection, the whole copy is one REPEATABLE READ transaction. With several, the
schema and its empty tables are committed first, one transaction exports its snapshot
(`pg_export_snapshot()`) and every other connection imports it (`SET TRANSACTION
SNAPSHOT`), so every table still comes from the same moment; each connection copies and
indexes whole tables, the largest first. Either way the copy is committed only so that
pg_dump can see it, and the caller drops the schema afterwards, also after a failure.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from app import ddl
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


Connect = Callable[[], psycopg.Connection[Any]]


class ScratchSchema:
    """Builds the copy in a schema of the source database, starting in the open transaction
    of `conn`; `connect` opens the extra connections of a parallel copy."""

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        plan: Plan,
        connect: Connect | None = None,
        connections: int = 1,
    ) -> None:
        self.conn = conn
        self.plan = plan
        self.schema = plan.scratch_schema
        self.place = ddl.InScratchSchema(plan)
        self.connect = connect
        self.connections = max(1, min(connections, len(plan.tables))) if connect else 1
        self.committed = False  # once True, only a DROP SCHEMA removes the copy
        self.stages: dict[str, float] = {}  # seconds of each step, for the run's last log line

    def build(self) -> list[TableResult]:
        """Create, fill and index every table, add the foreign keys; the caller commits."""
        started = time.monotonic()
        self._create()
        workers = [self.conn]
        try:
            if self.connections > 1:
                self.conn.commit()
                self.committed = True
                row = self.conn.execute("SELECT pg_export_snapshot()").fetchone()
                assert row is not None
                self._set_path(self.conn)
                assert self.connect is not None
                for _ in range(self.connections - 1):
                    workers.append(self.connect())
                    _import_snapshot(workers[-1], row[0])
                    self._set_path(workers[-1])
            self.stages["prepare"] = round(time.monotonic() - started, 3)
            started = time.monotonic()
            results = _in_parallel(self.plan.tables, workers, self._copy)
            for worker in workers[1:]:
                worker.commit()
            self.stages["copy"] = round(time.monotonic() - started, 3)
        finally:
            for worker in workers[1:]:
                worker.close()
        if self.committed:
            # A transaction that sees what the others committed.
            self.conn.commit()
            self._set_path(self.conn)
        started = time.monotonic()
        self._add_foreign_keys()
        self.stages["foreign_keys"] = round(time.monotonic() - started, 3)
        return results

    def drop(self) -> None:
        self.conn.execute(
            sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.schema))
        )

    def _create(self) -> None:
        """The schema, its types and sequences, and the empty tables."""
        conn = self.conn
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(self.schema)))
        conn.execute(
            sql.SQL("COMMENT ON SCHEMA {} IS {}").format(
                sql.Identifier(self.schema), sql.Literal(MARKER)
            )
        )
        self._set_path(conn)
        for statement in ddl.create_types(self.plan.catalog, self.place):
            conn.execute(statement)
        self._create_shared_sequences()
        for tp in self.plan.tables:
            for statement in ddl.create_table(tp, self.place):
                conn.execute(statement)
        self._check_self_contained()

    def _set_path(self, conn: psycopg.Connection[Any]) -> None:
        """For this transaction only: the copied objects first, as the deparsed expressions
        of defaults, CHECKs and indexes expect."""
        conn.execute(
            "SELECT set_config('search_path', %s, true)",
            [self.place.search_path(self.plan.catalog)],
        )

    def _add_foreign_keys(self) -> None:
        for tp in self.plan.tables:
            for fk in tp.foreign_keys:
                if fk.kept:
                    with ddl.explained(tp.table, "adding foreign keys to"):
                        self.conn.execute(ddl.foreign_key(self.plan, tp, fk, self.place))
                else:
                    log.warning(
                        "foreign key left out",
                        extra={"foreign_key": fk.describe(self.plan.catalog), "reason": fk.reason},
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

    def _copy(self, conn: psycopg.Connection[Any], tp: TablePlan) -> TableResult:
        """One table: its rows, its sequences, then its indexes and constraints."""
        started = time.monotonic()
        with ddl.explained(tp.table, "copying"):
            rows = conn.execute(ddl.insert_rows(tp, self.place)).rowcount
            for statement, params in ddl.continue_sequences(tp, self.place):
                conn.execute(statement, params)
        copied = time.monotonic()
        with ddl.explained(tp.table, "indexing"):
            for statement in ddl.index(tp, self.place):
                conn.execute(statement)
        return table_copied(tp, rows, started, index_seconds=time.monotonic() - copied)


def _import_snapshot(conn: psycopg.Connection[Any], snapshot: str) -> None:
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))


def _in_parallel(
    tables: list[TablePlan],
    workers: list[psycopg.Connection[Any]],
    copy: Callable[[psycopg.Connection[Any], TablePlan], TableResult],
) -> list[TableResult]:
    """Copy the tables, largest first, each on whichever connection is free; the first
    connection works in this thread, so that a signal interrupts its statement.

    On the first failure (or a signal) every other statement is cancelled, and that first
    error is raised once all threads are done."""
    queue = sorted(tables, key=lambda tp: tp.table.size, reverse=True)
    done: dict[int, TableResult] = {}
    failures: list[BaseException] = []
    guard = threading.Lock()

    def work(conn: psycopg.Connection[Any]) -> None:
        while True:
            with guard:
                if failures or not queue:
                    return
                tp = queue.pop(0)
            try:
                done[tp.table.oid] = copy(conn, tp)
            except BaseException as exc:
                with guard:
                    failures.append(exc)
                for other in workers:
                    if other is not conn:
                        other.cancel_safe(timeout=5)
                return

    threads = [
        threading.Thread(target=work, args=(conn,), name=f"copy-{n}", daemon=True)
        for n, conn in enumerate(workers[1:], start=1)
    ]
    for thread in threads:
        thread.start()
    try:
        work(workers[0])
        while failures == [] and any(t.is_alive() for t in threads):
            for thread in threads:
                thread.join(timeout=1)
    except BaseException as exc:
        with guard:
            failures.append(exc)
    if failures:
        while any(t.is_alive() for t in threads):
            for conn in workers:
                conn.cancel_safe(timeout=5)
            for thread in threads:
                thread.join(timeout=0.5)
        raise failures[0]
    return [done[tp.table.oid] for tp in tables]


def table_copied(
    tp: TablePlan, rows: int, started: float, *, index_seconds: float | None = None
) -> TableResult:
    """The result of one table's copy, logged; `seconds` includes its index builds."""
    result = TableResult(
        table=tp.table.qualified,
        scratch_name=tp.scratch_name,
        rows=rows,
        kept=tp.kept,
        faked=tp.faked,
        seconds=round(time.monotonic() - started, 3),
    )
    log.info(
        "table copied",
        extra={
            "table": result.table,
            "rows": result.rows,
            "kept": result.kept,
            "faked": result.faked,
            "seconds": result.seconds,
            **({} if index_seconds is None else {"index_seconds": round(index_seconds, 3)}),
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
