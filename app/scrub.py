"""The scratch schema on the source: created, filled from one snapshot, indexed.

With one connection, the whole copy is one REPEATABLE READ transaction. With several, the
schema and its empty tables are committed first, one transaction exports its snapshot
(`pg_export_snapshot()`) and every other connection imports it (`SET TRANSACTION
SNAPSHOT`), so every table still comes from the same moment; each connection copies and
indexes whole tables, the largest first. Either way the copy is committed only so that
pg_dump can see it, and the caller drops the schema afterwards, also after a failure.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from app import ddl, parallel, pseudonym
from app.errors import AllowListMismatch, ConfigError
from app.log import log
from app.plan import Plan, TablePlan

# A table smaller than this is never split between connections.
MIN_SLICE_BYTES = 64 * 1024 * 1024
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


Connect = Callable[[], psycopg.Connection[Any]]


class ScratchSchema:
    """Builds the copy in a schema of the source database, starting in the open transaction
    of `conn`; `connect` opens the extra connections of a parallel copy."""

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        plan: Plan,
        pseudonym_key: str | None = None,
        *,
        connect: Connect | None = None,
        connections: int = 1,
        unlogged: bool = False,
        foreign_keys_not_valid: bool = False,
    ) -> None:
        self.conn = conn
        self.plan = plan
        self.schema = plan.scratch_schema
        self.place = ddl.InScratchSchema(plan)
        self.pseudonym_key = pseudonym_key
        self.connect = connect
        self.connections = max(1, connections) if connect else 1
        self.unlogged = unlogged
        self.foreign_keys_not_valid = foreign_keys_not_valid
        # (table, constraint) of the foreign keys added NOT VALID: the dump must validate them.
        self.not_valid: list[tuple[str, str]] = []
        self.committed = False  # once True, only a DROP SCHEMA removes the copy
        self.stages: dict[str, float] = {}  # seconds of each step, for the run's last log line

    def build(self) -> list[TableResult]:
        """Create, fill and index every table, add the foreign keys; the caller commits."""
        if self.plan.needs_pseudonym_key and not self.pseudonym_key:
            raise ConfigError("the allow list pseudonymises columns: set PSEUDONYM_KEY")
        started = time.monotonic()
        self._create()
        slices = self._slices() if self.connections > 1 else []
        if sum(len(chunks) for _, chunks in slices) <= 1:
            self.stages["prepare"] = round(time.monotonic() - started, 3)
            started = time.monotonic()
            self._install_key(self.conn)
            results = [self._copy_whole(tp) for tp in self.plan.tables]
        else:
            self.conn.commit()
            self.committed = True
            results = self._copy_in_parallel(started, slices)
            started += self.stages["prepare"]
            # Ends the exporting transaction; the next one sees what the others committed.
            self.conn.commit()
            self._set_path(self.conn)
        self.stages["copy"] = round(time.monotonic() - started, 3)
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
            for statement in ddl.create_table(tp, self.place, unlogged=self.unlogged):
                conn.execute(statement)
        self._check_self_contained()

    def _set_path(self, conn: psycopg.Connection[Any]) -> None:
        """For this transaction only: the copied objects first, as the deparsed expressions
        of defaults, CHECKs and indexes expect."""
        conn.execute(
            "SELECT set_config('search_path', %s, true)",
            [self.place.search_path(self.plan.catalog)],
        )

    def _install_key(self, conn: psycopg.Connection[Any]) -> None:
        """For this transaction only: the pseudonym key, where the copy's statements read it."""
        if self.plan.needs_pseudonym_key:
            assert self.pseudonym_key is not None
            pseudonym.install_key(conn, self.pseudonym_key)

    def _add_foreign_keys(self) -> None:
        """Every kept foreign key. One that holds on the source holds in the copy, made of
        the same key values from the same snapshot: with `foreign_keys_not_valid` it is
        added without checking them again (the dump's restore checks it)."""
        for tp in self.plan.tables:
            for fk in tp.foreign_keys:
                if not fk.kept:
                    log.warning(
                        "foreign key left out",
                        extra={"foreign_key": fk.describe(self.plan.catalog), "reason": fk.reason},
                    )
                    continue
                not_valid = self.foreign_keys_not_valid and fk.constraint.validated
                with ddl.explained(tp.table, "adding foreign keys to"):
                    self.conn.execute(
                        ddl.foreign_key(self.plan, tp, fk, self.place, not_valid=not_valid)
                    )
                if not_valid:
                    self.not_valid.append((tp.scratch_name, fk.constraint.name))

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

    def _copy_whole(self, tp: TablePlan) -> TableResult:
        """One table in the open transaction: its rows, its indexes, its sequences."""
        started = time.monotonic()
        rows = 0
        if not tp.structure_only:  # no rows, its indexes all the same
            with ddl.explained(tp.table, "copying"):
                rows = self.conn.execute(ddl.insert_rows(tp, self.place)).rowcount
        copied = time.monotonic()
        self._index(self.conn, tp)
        return table_copied(tp, rows, started, index_seconds=time.monotonic() - copied)

    def _index(self, conn: psycopg.Connection[Any], tp: TablePlan) -> None:
        """Indexes and constraints after the load; then the sequences, whose max() the
        primary key now answers."""
        with ddl.explained(tp.table, "indexing"):
            for statement in ddl.index(tp, self.place):
                conn.execute(statement)
        with ddl.explained(tp.table, "copying"):
            for statement, params in ddl.continue_sequences(tp, self.place):
                conn.execute(statement, params)

    def _copy_in_parallel(
        self, started: float, slices: list[tuple[TablePlan, list[ddl.Chunk | None]]]
    ) -> list[TableResult]:
        """Every connection imports the snapshot this transaction exports, which stays open
        (and idle) until all of them are done."""
        conn = self.conn
        row = conn.execute("SELECT pg_export_snapshot()").fetchone()
        assert row is not None and self.connect is not None
        conn.execute("SELECT set_config('idle_in_transaction_session_timeout', '0', true)")
        workers: list[psycopg.Connection[Any]] = []
        try:
            for _ in range(min(self.connections, sum(len(chunks) for _, chunks in slices))):
                workers.append(self.connect())
                workers[-1].isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            self.stages["prepare"] = round(time.monotonic() - started, 3)
            return _ParallelCopy(self, row[0], slices, workers).run()
        finally:
            for worker in workers:
                worker.close()

    def _slices(self) -> list[tuple[TablePlan, list[ddl.Chunk | None]]]:
        """Each table whole, or, if it is big next to the others and has a primary key to
        number its rows by, in slices of about equal row counts (estimated: the last slice
        takes whatever is left), so that no single table keeps one connection busy alone."""
        tables = self.plan.tables
        total = sum(tp.table.size for tp in tables)
        target = max(total / (2 * self.connections), MIN_SLICE_BYTES, 1)
        out: list[tuple[TablePlan, list[ddl.Chunk | None]]] = []
        for tp in tables:
            if tp.structure_only:
                out.append((tp, []))
                continue
            parts = min(math.ceil(tp.table.size / target), 2 * self.connections)
            rows = 0.0
            if parts > 1 and tp.order_by and tp.table.relkind == "r":
                found = self.conn.execute(
                    "SELECT reltuples FROM pg_class WHERE oid = %s", [tp.table.oid]
                ).fetchone()
                rows = float(found[0]) if found else 0.0
            if rows < parts:  # not split, or never analyzed
                out.append((tp, [None]))
                continue
            bounds = [round(rows * i / parts) for i in range(parts)]
            chunks: list[ddl.Chunk | None] = [
                ddl.Chunk(bounds[i], bounds[i + 1]) for i in range(parts - 1)
            ]
            out.append((tp, [*chunks, ddl.Chunk(bounds[-1], None)]))
        return out


class _ParallelCopy:
    """The slices of every table, the biggest first, each in a transaction of its own that
    imports the snapshot; a table's indexes go ahead of the queue once its last slice is in."""

    def __init__(
        self,
        scratch: ScratchSchema,
        snapshot: str,
        slices: list[tuple[TablePlan, list[ddl.Chunk | None]]],
        workers: list[psycopg.Connection[Any]],
    ) -> None:
        self.scratch = scratch
        self.snapshot = snapshot
        self.pool = parallel.Pool(workers)
        self.guard = threading.Lock()
        self.left = {tp.table.oid: len(chunks) for tp, chunks in slices}
        self.rows = {tp.table.oid: 0 for tp, _ in slices}
        self.started: dict[int, float] = {}
        self.results: dict[int, TableResult] = {}
        tasks = [(tp.table.size / len(chunks), tp, c) for tp, chunks in slices for c in chunks]
        for _, tp, chunk in sorted(tasks, key=lambda t: t[0], reverse=True):
            self.pool.add(self._copy_task(tp, chunk))
        for tp, chunks in slices:
            if not chunks:  # structure only: no rows, its indexes all the same
                self.started[tp.table.oid] = time.monotonic()
                self.pool.add(self._index_task(tp))

    def run(self) -> list[TableResult]:
        self.pool.run()
        return [self.results[tp.table.oid] for tp in self.scratch.plan.tables]

    def _copy_task(self, tp: TablePlan, chunk: ddl.Chunk | None) -> parallel.Task:
        return lambda conn: self._copy(conn, tp, chunk)

    def _index_task(self, tp: TablePlan) -> parallel.Task:
        return lambda conn: self._index(conn, tp)

    def _copy(self, conn: psycopg.Connection[Any], tp: TablePlan, chunk: ddl.Chunk | None) -> None:
        oid = tp.table.oid
        with self.guard:
            self.started.setdefault(oid, time.monotonic())
        conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(self.snapshot)))
        self.scratch._set_path(conn)
        self.scratch._install_key(conn)
        with ddl.explained(tp.table, "copying"):
            rows = conn.execute(ddl.insert_rows(tp, self.scratch.place, chunk)).rowcount
        conn.commit()
        with self.guard:
            self.rows[oid] += rows
            self.left[oid] -= 1
            last = self.left[oid] == 0
        if last:
            self.pool.add(self._index_task(tp), first=True)

    def _index(self, conn: psycopg.Connection[Any], tp: TablePlan) -> None:
        started = time.monotonic()
        self.scratch._set_path(conn)
        self.scratch._index(conn, tp)
        conn.commit()
        oid = tp.table.oid
        self.results[oid] = table_copied(
            tp, self.rows[oid], self.started[oid], index_seconds=time.monotonic() - started
        )


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
