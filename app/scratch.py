"""Where the copy is made: one small interface, one implementation per mode.

`__main__` reads the plan from the source and hands it to a `Scratch`, which builds the
copy, tells pg_dump what to dump, and removes the copy when the run ends, however it ends.

- `schema` (default): a scratch schema in the source database (`SchemaOnSource`).
- `database`: another database; the source is only read (`app.scratchdb`).
- `embedded`: a throwaway server the job starts and removes (`app.embedded`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import psycopg
from psycopg import sql

from app import db, toc
from app import manifest as mf
from app.config import Config
from app.errors import DatabaseError, JobError
from app.log import log
from app.plan import Plan, TablePlan
from app.scrub import ScratchSchema, TableResult, drop_leftover


@dataclass(frozen=True)
class DumpSource:
    """What pg_dump reads: a connection string (None: libpq's PG* variables) and the one
    schema to dump (None: the whole database)."""

    url: str | None
    schema: str | None


# Where a copied table sits in the scratch: (schema, name).
Located = Callable[[TablePlan], tuple[str, str]]
# Called with the finished copy before it is committed: the connection that holds it, and
# where each table sits there (the run scans the kept columns with it).
Inspect = Callable[[psycopg.Connection[Any], Located], None]


class Scratch(Protocol):
    mode: str
    writes_source: bool  # the copy is made in the source, which then needs CREATE
    # Set by the run once pg_dump is known, before `prepare`: whether its archive can be
    # rewritten (app.toc), which lets the copy use UNLOGGED tables (and NOT VALID keys).
    restore_like_source: bool

    @property
    def stages(self) -> dict[str, float]:
        """Seconds of each step of the copy, for the run's last log line."""
        ...

    def server_major(self) -> int:
        """The major of the server pg_dump reads, known before anything is written."""
        ...

    def prepare(self) -> None:
        """Lock, check and clear what a killed run left, before the plan is read."""
        ...

    def build(
        self,
        source: psycopg.Connection[Any],
        plan: Plan,
        allow_list_sha256: str,
        inspect: Inspect,
    ) -> list[TableResult]:
        """Make the copy from the snapshot open on `source`, let `inspect` see it, add the
        manifest, and commit it for pg_dump."""
        ...

    def reset(self) -> None:
        """Undo a failed attempt so that the copy can start again from a fresh snapshot."""
        ...

    def dump_source(self) -> DumpSource: ...

    def rewrite_dump(self, path: Path) -> None:
        """Make the finished dump restore ordinary tables and checked foreign keys where
        the copy used UNLOGGED tables or NOT VALID keys."""
        ...

    def close(self) -> None:
        """Remove the copy; log, never raise, when that fails."""
        ...


def open_scratch(
    config: Config, lock_conn: psycopg.Connection[Any], work: psycopg.Connection[Any]
) -> Scratch:
    """The scratch the configuration asks for; nothing is written yet."""
    if config.mode == "embedded":
        from app.embedded import EmbeddedScratch

        return EmbeddedScratch(config, work)
    if config.mode == "database":
        from app.scratchdb import ScratchDatabase

        assert config.scratch_database_url is not None
        return ScratchDatabase(config, config.scratch_database_url, work)
    return SchemaOnSource(config, lock_conn, work)


class SchemaOnSource:
    """The scratch schema in the source database, committed only so that pg_dump sees it,
    dropped afterwards (and at the next start, if a run was killed)."""

    mode = "schema"
    writes_source = True

    def __init__(
        self, config: Config, lock_conn: psycopg.Connection[Any], work: psycopg.Connection[Any]
    ) -> None:
        self.config = config
        self.lock_conn = lock_conn
        self.work = work
        self.committed = False
        # Set once pg_dump is known: whether its archive can be made to restore like the
        # source (app.toc), which lets the copy use UNLOGGED tables and NOT VALID keys.
        self.restore_like_source = False
        self.copy: ScratchSchema | None = None
        self.stages: dict[str, float] = {}

    def server_major(self) -> int:
        return self.work.info.server_version // 10000

    def prepare(self) -> None:
        row = self.lock_conn.execute("SELECT pg_is_in_recovery()").fetchone()
        if row and row[0]:
            raise DatabaseError(
                "the source is a hot standby, where the scratch schema cannot be created: "
                "set SCRATCH_DATABASE_URL to another database, or to 'embedded'"
            )
        drop_leftover(self.lock_conn, self.config.scratch_schema)

    def build(
        self,
        source: psycopg.Connection[Any],
        plan: Plan,
        allow_list_sha256: str,
        inspect: Inspect,
    ) -> list[TableResult]:
        self.work = source
        self.copy = ScratchSchema(
            source,
            plan,
            self.config.pseudonym_key,
            connect=lambda: db.connect(self.config),
            connections=self.config.copy_connections,
            unlogged=self.config.scratch_unlogged and self.restore_like_source,
            foreign_keys_not_valid=self.restore_like_source,
        )
        try:
            results = self.copy.build()
        finally:
            self.committed = self.copy.committed  # a parallel copy commits as it goes
        self.stages = self.copy.stages
        inspect(source, lambda tp: (plan.scratch_schema, tp.scratch_name))
        location = mf.in_scratch(self.config.scratch_schema)
        contents = mf.collect(
            plan,
            results,
            location,
            source=source,
            scratch_schema=self.config.scratch_schema,
            allow_list_sha256=allow_list_sha256,
        )
        mf.write(source, location, contents)
        self.committed = True  # from here on the schema may exist for others: drop it
        source.commit()
        return results

    def reset(self) -> None:
        if not self.work.broken:
            self.work.rollback()
        if self.committed:
            self._drop_committed()
            self.committed = False

    def rewrite_dump(self, path: Path) -> None:
        """The finished dump, made to restore ordinary tables and checked foreign keys."""
        if not self.restore_like_source or self.copy is None:
            return
        rewritten = toc.rewrite(path, self.copy.not_valid)
        log.info(
            "dump set to restore ordinary tables and checked foreign keys",
            extra={"tables": rewritten.tables, "foreign_keys": rewritten.foreign_keys},
        )

    def dump_source(self) -> DumpSource:
        return DumpSource(self.config.database_url, self.config.scratch_schema)

    def close(self) -> None:
        """Roll back what is uncommitted, drop what was committed; say loudly when the
        schema may be left behind."""
        schema = self.config.scratch_schema
        if not self.work.closed and not self.work.broken:
            with contextlib.suppress(psycopg.Error):  # a lost connection rolled back already
                self.work.rollback()
        if not self.committed:
            return
        try:
            self._drop_committed()
            log.info("scratch schema dropped", extra={"schema": schema})
        except (psycopg.Error, JobError) as exc:
            log.error(
                "could not drop the scratch schema; the next run drops it",
                extra={"schema": schema, "error": str(exc)},
            )

    def _drop_committed(self) -> None:
        """Drop the scratch schema while holding the lock: on the lock's connection, or,
        when the server dropped that connection (a restart) and the lock with it, on a new
        connection that takes the lock again first (LockHeld: another run has started and
        owns the schema)."""
        schema = self.config.scratch_schema
        drop = sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
        try:
            self.lock_conn.execute(drop)
            return
        except psycopg.OperationalError:
            if not self.lock_conn.broken:
                raise  # a lock timeout, say: the connection and the lock are fine
        log.warning("lost the connection; reconnecting to drop the scratch schema")
        with db.connect(self.config, autocommit=True) as conn:
            db.take_lock(conn, schema)
            conn.execute(drop)
