"""The copy in a database of its own: the source is only read.

The source sees one REPEATABLE READ READ ONLY transaction and, per table, a
`COPY (SELECT <kept columns and fakes> FROM t) TO STDOUT` streamed into `COPY ... FROM
STDIN` on the scratch database, so only sanitised rows ever leave it, nothing is written
or locked beyond ACCESS SHARE there, and a hot standby will do. The scratch database gets
the copied tables, types and sequences under their original schemas and names, so the
dump restores with no renaming. It is emptied at the start and at the end, and only ever
when it is empty or carries this job's marker.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from app import db, ddl, toc
from app import manifest as mf
from app.config import Config
from app.errors import ConfigError, JobError
from app.log import log
from app.plan import Plan, TablePlan
from app.scratch import DumpSource, Inspect
from app.scrub import TableResult, table_copied

MARKER = "sanitised-dump scratch database: emptied at every run, safe to empty"
LOCK_SCOPE = "scratch database"
WHAT, VARIABLE = "the scratch database", "SCRATCH_DATABASE_URL"
BATCH_BYTES = 1 << 20
MANIFEST_MODES = {"database": "scratch_database", "embedded": "embedded_server"}

# What makes a database not empty: anything a fresh CREATE DATABASE does not have.
USER_OBJECTS = """
SELECT 'schema ' || quote_ident(nspname) FROM pg_namespace
 WHERE nspname NOT IN ('public', 'information_schema') AND nspname NOT LIKE 'pg\\_%'
UNION ALL
SELECT 'extension ' || quote_ident(extname) FROM pg_extension WHERE extname <> 'plpgsql'
UNION ALL
SELECT 'relation ' || c.oid::regclass::text FROM pg_class c
 WHERE c.relnamespace = 'public'::regnamespace AND c.relkind NOT IN ('i', 'I', 'c', 't')
UNION ALL
SELECT 'type ' || t.oid::regtype::text FROM pg_type t
 WHERE t.typnamespace = 'public'::regnamespace AND t.typrelid = 0 AND t.typelem = 0
UNION ALL
SELECT 'function ' || p.oid::regprocedure::text FROM pg_proc p
 WHERE p.pronamespace = 'public'::regnamespace
UNION ALL
SELECT 'large objects' FROM pg_largeobject_metadata HAVING count(*) > 0
LIMIT 5
"""

IDENTITY = """
SELECT (SELECT system_identifier FROM pg_control_system()) AS system,
       d.oid, d.datname, shobj_description(d.oid, 'pg_database') AS comment
FROM pg_database d WHERE d.datname = current_database()
"""


class ScratchDatabase:
    """Another database (same cluster as the source or another server) for the copy."""

    writes_source = False

    def __init__(
        self, config: Config, url: str, source: psycopg.Connection[Any], mode: str = "database"
    ) -> None:
        self.mode = mode
        self.config = config
        self.url = url
        self.source = source
        self.conn: psycopg.Connection[Any] | None = None
        self.lock_conn: psycopg.Connection[Any] | None = None
        self.owned = False  # locked and checked: this run may empty it
        self.stages: dict[str, float] = {}
        self.restore_like_source = False

    @property
    def unlogged(self) -> bool:
        """UNLOGGED tables: nothing of the copy goes through the scratch server's WAL."""
        return self.config.scratch_unlogged and self.restore_like_source

    # -- the interface -----------------------------------------------------------------

    def server_major(self) -> int:
        return self._connection().info.server_version // 10000

    def prepare(self) -> None:
        """Refuse the source and anyone else's database; lock; empty what a killed run left."""
        conn = self._connection()
        self.lock_conn = db.connect(
            self.config, autocommit=True, url=self.url, what=WHAT, variable=VARIABLE
        )
        here = _identity(conn)
        there = db.read_through_conflicts(self.source, lambda: _identity(self.source))
        self.source.rollback()
        if here["system"] == there["system"] and (
            here["oid"] == there["oid"] or here["datname"] == there["datname"]
        ):
            raise ConfigError(
                f"SCRATCH_DATABASE_URL points at the source database {here['datname']!r} "
                "(or its replica): point it at another, empty database"
            )
        db.take_lock(self.lock_conn, LOCK_SCOPE)
        if conn.info.server_version // 10000 < self.source.info.server_version // 10000:
            log.warning(
                "the scratch server is older than the source: statements the source prints "
                "may not parse there; use a scratch server of the source's major or newer",
                extra={
                    "scratch_version": conn.info.server_version,
                    "source_version": self.source.info.server_version,
                },
            )
        if here["comment"] == MARKER:
            self.owned = True
            self.empty()
        else:
            found = [r[0] for r in conn.execute(USER_OBJECTS).fetchall()]
            conn.rollback()
            if found:
                raise ConfigError(
                    f"the scratch database {here['datname']!r} is not empty "
                    f"({', '.join(found)}) and was not made by this job: point "
                    "SCRATCH_DATABASE_URL at an empty database, which the job then owns"
                )
            try:
                conn.execute(
                    sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                        sql.Identifier(here["datname"]), sql.Literal(MARKER)
                    )
                )
                conn.commit()
            except psycopg.errors.InsufficientPrivilege:
                raise ConfigError(
                    f"cannot mark the scratch database {here['datname']!r} as this job's: "
                    "the role in SCRATCH_DATABASE_URL must own it"
                ) from None
            self.owned = True
        log.info("scratch database ready", extra={"database": here["datname"]})

    def build(
        self,
        source: psycopg.Connection[Any],
        plan: Plan,
        allow_list_sha256: str,
        inspect: Inspect,
    ) -> list[TableResult]:
        """Everything in one transaction on the scratch side: a failure leaves it empty.
        The manifest goes into a schema of its own, as no table was renamed."""
        self.source = source
        started = time.monotonic()
        conn = self._connection()
        place = ddl.UnderOriginalNames()
        catalog = plan.catalog
        for schema in _schemas(plan):
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute("SELECT set_config('search_path', %s, true)", [place.search_path(catalog)])
        for name, schema in catalog.extensions:
            conn.execute(
                sql.SQL("CREATE EXTENSION IF NOT EXISTS {} WITH SCHEMA {}").format(
                    sql.Identifier(name), sql.Identifier(schema)
                )
            )
        for statement in ddl.create_types(catalog, place):
            conn.execute(statement)
        for seq, copy, statement in ddl.shared_sequences(catalog, place):
            conn.execute(statement)
            row = source.execute(
                sql.SQL("SELECT last_value, is_called FROM {}").format(
                    sql.Identifier(seq.schema, seq.name)
                )
            ).fetchone()
            assert row is not None
            conn.execute(
                "SELECT setval(%s::regclass, %s, %s)", [copy.as_string(conn), row[0], row[1]]
            )
        for tp in plan.tables:
            for statement in ddl.create_table(tp, place, unlogged=self.unlogged):
                conn.execute(statement)
        started = self._timed("prepare", started)
        results = [self._copy(source, conn, tp, place) for tp in plan.tables]
        # The rows are in: the snapshot is no longer needed, so a hot standby need not hold
        # back its replay (or cancel the run) while the indexes are built.
        _release(source)
        started = self._timed("copy", started)
        for tp in plan.tables:
            with ddl.explained(tp.table, "indexing"):
                for statement in ddl.index(tp, place):
                    conn.execute(statement)
        started = self._timed("indexes", started)
        for tp in plan.tables:
            for fk in tp.foreign_keys:
                if fk.kept:
                    with ddl.explained(tp.table, "adding foreign keys to"):
                        conn.execute(ddl.foreign_key(plan, tp, fk, place))
        self._timed("foreign_keys", started)
        inspect(conn, place.table)
        contents = mf.collect(
            plan,
            results,
            mf.HOME,
            source=source,
            scratch=conn,
            scratch_schema=None,
            allow_list_sha256=allow_list_sha256,
            mode=MANIFEST_MODES[self.mode],
        )
        mf.write(conn, mf.HOME, contents)
        conn.commit()
        _release(source)  # the manifest's reads of the catalog
        return results

    def reset(self) -> None:
        if self.conn is not None and not self.conn.broken:
            self.conn.rollback()
        self.empty()

    def dump_source(self) -> DumpSource:
        return DumpSource(self.url, None)

    def rewrite_dump(self, path: Path) -> None:
        if self.unlogged:
            rewritten = toc.rewrite(path, [])
            log.info("dump set to restore ordinary tables", extra={"tables": rewritten.tables})

    def close(self) -> None:
        try:
            if self.conn is not None and not self.conn.broken:
                self.conn.rollback()
            if self.owned:
                self.empty()
                log.info("scratch database emptied")
        except (psycopg.Error, JobError) as exc:
            log.error(
                "could not empty the scratch database; the next run empties it",
                extra={"error": str(exc)},
            )
        finally:
            for conn in (self.conn, self.lock_conn):
                if conn is not None:
                    conn.close()

    # -- the copy ------------------------------------------------------------------------

    def _timed(self, stage: str, started: float) -> float:
        """Record the seconds since `started` as `stage`; return the time now."""
        now = time.monotonic()
        self.stages[stage] = round(now - started, 3)
        return now

    def _copy(
        self,
        source: psycopg.Connection[Any],
        conn: psycopg.Connection[Any],
        tp: TablePlan,
        place: ddl.Placement,
    ) -> TableResult:
        """Stream the source's sanitised rows into the scratch table, block by block."""
        started = time.monotonic()
        if tp.structure_only:
            return table_copied(tp, 0, started)
        copy_out = sql.SQL("COPY ({}) TO STDOUT").format(ddl.select_rows(tp))
        copy_in = sql.SQL("COPY {} ({}) FROM STDIN").format(
            ddl.table_ident(place, tp), ddl.column_list(tp)
        )
        with ddl.explained(tp.table, "copying"):
            with source.cursor() as out_cur, conn.cursor() as in_cur:
                with out_cur.copy(copy_out) as rows_out, in_cur.copy(copy_in) as rows_in:
                    # The source hands out one row at a time; writing a megabyte at once
                    # makes the relay as fast as reading alone.
                    batch = bytearray()
                    for row in rows_out:
                        batch += row
                        if len(batch) >= BATCH_BYTES:
                            rows_in.write(batch)
                            batch = bytearray()
                    rows_in.write(batch)
                rows = in_cur.rowcount
            for statement, params in ddl.continue_sequences(tp, place):
                conn.execute(statement, params)
        return table_copied(tp, rows, started)

    # -- emptying --------------------------------------------------------------------------

    def empty(self) -> None:
        """Drop everything in the scratch database (it carries this job's marker)."""
        conn = self._connection()
        conn.rollback()
        with conn.transaction():
            for statement in _drops(conn):
                conn.execute(statement)

    def _connection(self) -> psycopg.Connection[Any]:
        if self.conn is None or self.conn.closed:
            self.conn = db.connect(self.config, url=self.url, what=WHAT, variable=VARIABLE)
        return self.conn


def _release(source: psycopg.Connection[Any]) -> None:
    """End the source's transaction, and with it its snapshot."""
    with contextlib.suppress(psycopg.Error):
        source.rollback()


def _identity(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(IDENTITY).fetchone()
    assert row is not None
    return row


def _schemas(plan: Plan) -> list[str]:
    """Every schema a copied object lives in, public (which always exists) aside."""
    catalog = plan.catalog
    names = [t.schema for t in catalog.tables] + [t.schema for t in catalog.copied_types]
    names += [s.schema for s in catalog.sequences] + [s for _, s in catalog.extensions]
    return [n for n in dict.fromkeys(names) if n != "public"]


def _drops(conn: psycopg.Connection[Any]) -> list[sql.Composed]:
    """Schemas other than public, extensions, then whatever public holds."""
    statements = []
    for (name,) in conn.execute(
        "SELECT nspname FROM pg_namespace WHERE nspname NOT IN ('public', 'information_schema')"
        " AND nspname NOT LIKE 'pg\\_%' ORDER BY 1"
    ):
        statements.append(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
    for kind, name in conn.execute(
        "SELECT CASE WHEN relkind = 'S' THEN 'SEQUENCE' WHEN relkind IN ('v') THEN 'VIEW'"
        " WHEN relkind = 'm' THEN 'MATERIALIZED VIEW' WHEN relkind = 'f' THEN 'FOREIGN TABLE'"
        " ELSE 'TABLE' END, relname FROM pg_class WHERE relnamespace = 'public'::regnamespace"
        " AND relkind IN ('r', 'p', 'S', 'v', 'm', 'f') ORDER BY 2"
    ):
        statements.append(
            sql.SQL("DROP {} IF EXISTS {} CASCADE").format(
                sql.SQL(kind), sql.Identifier("public", name)
            )
        )
    for (name,) in conn.execute(
        "SELECT extname FROM pg_extension WHERE extname <> 'plpgsql' ORDER BY 1"
    ):
        statements.append(
            sql.SQL("DROP EXTENSION IF EXISTS {} CASCADE").format(sql.Identifier(name))
        )
    for (name,) in conn.execute(
        "SELECT typname FROM pg_type WHERE typnamespace = 'public'::regnamespace"
        " AND typrelid = 0 AND typelem = 0 AND typtype <> 'b' ORDER BY 1"
    ):
        statements.append(
            sql.SQL("DROP TYPE IF EXISTS {} CASCADE").format(sql.Identifier("public", name))
        )
    for (signature,) in conn.execute(
        "SELECT p.oid::regprocedure::text FROM pg_proc p"
        " WHERE p.pronamespace = 'public'::regnamespace"
        " AND NOT EXISTS (SELECT 1 FROM pg_depend e WHERE e.classid = 'pg_proc'::regclass"
        " AND e.objid = p.oid AND e.deptype = 'e') ORDER BY 1"
    ):
        statements.append(sql.SQL("DROP ROUTINE IF EXISTS {} CASCADE").format(sql.SQL(signature)))
    return statements
