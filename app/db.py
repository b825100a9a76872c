"""Connections to the source: bounded retries, a visible name, short lock waits, one run at
a time (SPEC §6)."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from app.config import Config
from app.errors import DatabaseError, LockHeld
from app.log import log

# How soon a server session notices that the job died (SIGKILL, OOM): its INSERT stops and
# rolls back, so the next run, waiting at most LOCK_TIMEOUT on the scratch schema's name or
# tables, is not blocked by it.
CHECK_INTERVAL = "1s"

# Times a hot standby may cancel a short read of the source (the session's set-up, the
# lock, the identity check, the conflict counter) before the run gives up; the copy itself
# is retried whole, by its caller.
SHORT_READ_ATTEMPTS = 5


def connect(
    config: Config,
    *,
    autocommit: bool = False,
    url: str | None = None,
    what: str = "the source",
    variable: str = "DATABASE_URL or the PG* variables",
) -> psycopg.Connection[Any]:
    """Connect with bounded, logged retries; exit 4 when the server stays unreachable.

    `url` defaults to the source's; `what` and `variable` name the server in messages."""

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "cannot connect, retrying",
            extra={
                "server": what,
                "attempt": state.attempt_number,
                "of": config.connect_attempts,
                "error": _first_line(exc),
            },
        )

    retrying = Retrying(
        stop=stop_after_attempt(config.connect_attempts),
        wait=wait_exponential(multiplier=config.connect_wait, max=30),
        retry=retry_if_exception_type(psycopg.OperationalError),
        before_sleep=before_sleep,
        reraise=True,
    )
    try:
        conn = retrying(
            psycopg.connect,
            (config.database_url if url is None else url) or "",
            autocommit=autocommit,
            application_name=config.application_name,
            connect_timeout=10,
        )
    except psycopg.OperationalError as exc:
        raise DatabaseError(
            f"cannot connect to {what} after {config.connect_attempts} attempts: "
            f"{_first_line(exc)} (check {variable})"
        ) from None

    def set_up() -> None:
        conn.execute("SELECT set_config('lock_timeout', %s, false)", [config.lock_timeout])
        if conn.info.server_version >= 140000:
            conn.execute(
                "SELECT set_config('client_connection_check_interval', %s, false)",
                [CHECK_INTERVAL],
            )
        if not autocommit:
            conn.commit()

    try:
        read_through_conflicts(conn, set_up)
    except psycopg.Error as exc:
        conn.close()
        raise DatabaseError(f"cannot set up the session: {_first_line(exc)}") from None
    except DatabaseError:
        conn.close()
        raise
    return conn


def lock_key(scope: str) -> int:
    """A stable bigint advisory lock key for one scratch schema on one database."""
    digest = hashlib.sha256(f"sanitised-dump:{scope}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def take_lock(conn: psycopg.Connection[Any], scope: str) -> None:
    """Session-level advisory lock on an idle connection of its own: it is released when
    the job ends, however it ends, and never waits."""
    row = read_through_conflicts(
        conn,
        lambda: conn.execute("SELECT pg_try_advisory_lock(%s)", [lock_key(scope)]).fetchone(),
    )
    if not row or not row[0]:
        raise LockHeld(
            f"another run holds the lock for scratch schema {scope!r} on this database: "
            "wait for it to finish"
        )


def check_privileges(
    conn: psycopg.Connection[Any], tables: list[tuple[str, str]], *, create: bool = True
) -> None:
    """CREATE on the database (when the copy is made there) and SELECT on every listed
    table, before any write."""
    row = conn.execute(
        "SELECT current_user, current_database(),"
        " has_database_privilege(current_database(), 'CREATE')"
    ).fetchone()
    assert row is not None
    user, database, can_create = row
    if create and not can_create:
        raise DatabaseError(
            f"role {user!r} lacks the CREATE privilege on database {database!r}, needed for the "
            f"scratch schema: GRANT CREATE ON DATABASE {database} TO {user}"
        )
    missing = []
    for schema, table in tables:
        qualified = sql.Identifier(schema, table).as_string(conn)
        ok = conn.execute(
            "SELECT has_table_privilege(%s::regclass, 'SELECT')", [qualified]
        ).fetchone()
        if not ok or not ok[0]:
            missing.append(qualified)
    if missing:
        raise DatabaseError(
            f"role {user!r} lacks SELECT on {', '.join(missing)}: grant it, or leave the tables out"
        )


def is_recovery_conflict(exc: BaseException) -> bool:
    """A hot standby cancelled the query, or ended the session, because replaying the
    primary's changes needed rows or locks the snapshot still used."""
    if isinstance(exc, psycopg.Error) and exc.sqlstate not in (None, "40001"):
        return False
    if not isinstance(exc, psycopg.Error | DatabaseError):
        return False
    return "conflict with recovery" in str(exc)


def conflict_error(what: str, times: int) -> DatabaseError:
    """The standby kept cancelling `what`: say what to set."""
    return DatabaseError(
        f"the hot standby cancelled {what} {times} times to replay changes from the primary "
        "(conflict with recovery): set hot_standby_feedback = on on the standby, or raise "
        "its max_standby_streaming_delay above the copy's duration, or read from the primary"
    )


def read_through_conflicts[T](conn: psycopg.Connection[Any], read: Callable[[], T]) -> T:
    """Run a short read of the source again when a hot standby cancelled it to replay the
    primary's changes: a standby that cancels at once may hit any query, however short.
    `conn` must hold no transaction worth keeping: a cancelled one is rolled back."""
    attempt = 1
    while True:
        try:
            return read()
        except psycopg.Error as exc:
            if not is_recovery_conflict(exc) or conn.broken:
                raise
            if attempt >= SHORT_READ_ATTEMPTS:
                raise conflict_error("a read of the source", attempt) from None
            if not conn.autocommit:
                conn.rollback()
            log.warning(
                "the standby cancelled a read (conflict with recovery): reading again",
                extra={"attempt": attempt, "of": SHORT_READ_ATTEMPTS},
            )
            time.sleep(0.1 * attempt)
            attempt += 1


RECOVERY_CONFLICTS = """
SELECT CASE WHEN pg_is_in_recovery() THEN
       (SELECT confl_tablespace + confl_lock + confl_snapshot + confl_bufferpin + confl_deadlock
          FROM pg_stat_database_conflicts WHERE datname = current_database()) END
"""


def recovery_conflicts(conn: psycopg.Connection[Any]) -> int | None:
    """Queries the standby has cancelled or ended so far in this database; None on a
    primary. Read on an idle autocommit connection, which no such conflict ends."""
    row = read_through_conflicts(conn, lambda: conn.execute(RECOVERY_CONFLICTS).fetchone())
    return None if row is None or row[0] is None else int(row[0])


def conflict_counted(conn: psycopg.Connection[Any], before: int, wait: float = 3.0) -> bool:
    """Whether the standby counted a conflict since `before`: the session it ends may close
    before its message reaches the client, so a lost connection alone does not tell."""
    deadline = time.monotonic() + wait
    while True:
        now = recovery_conflicts(conn)
        if now is not None and now > before:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def _first_line(exc: BaseException | None) -> str:
    return str(exc).strip().splitlines()[0] if exc and str(exc).strip() else repr(exc)


logging.getLogger("psycopg").setLevel(logging.ERROR)
