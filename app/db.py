"""Connections to the source: bounded retries, a visible name, short lock waits, one run at
a time (SPEC §6)."""

from __future__ import annotations

import hashlib
import logging
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


def connect(config: Config, *, autocommit: bool = False) -> psycopg.Connection[Any]:
    """Connect with bounded, logged retries; exit 4 when the server stays unreachable."""

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "cannot connect, retrying",
            extra={
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
            config.database_url or "",
            autocommit=autocommit,
            application_name=config.application_name,
            connect_timeout=10,
        )
    except psycopg.OperationalError as exc:
        raise DatabaseError(
            f"cannot connect to the source after {config.connect_attempts} attempts: "
            f"{_first_line(exc)} (check DATABASE_URL or the PG* variables)"
        ) from None
    try:
        conn.execute("SELECT set_config('lock_timeout', %s, false)", [config.lock_timeout])
        if conn.info.server_version >= 140000:
            conn.execute(
                "SELECT set_config('client_connection_check_interval', %s, false)",
                [CHECK_INTERVAL],
            )
        if not autocommit:
            conn.commit()
    except psycopg.Error as exc:
        conn.close()
        raise DatabaseError(f"cannot set up the session: {_first_line(exc)}") from None
    return conn


def lock_key(scope: str) -> int:
    """A stable bigint advisory lock key for one scratch schema on one database."""
    digest = hashlib.sha256(f"sanitised-dump:{scope}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def take_lock(conn: psycopg.Connection[Any], scope: str) -> None:
    """Session-level advisory lock on an idle connection of its own: it is released when
    the job ends, however it ends, and never waits."""
    row = conn.execute("SELECT pg_try_advisory_lock(%s)", [lock_key(scope)]).fetchone()
    if not row or not row[0]:
        raise LockHeld(
            f"another run holds the lock for scratch schema {scope!r} on this database: "
            "wait for it to finish"
        )


def check_privileges(conn: psycopg.Connection[Any], tables: list[tuple[str, str]]) -> None:
    """CREATE on the database and SELECT on every listed table, before any write."""
    row = conn.execute(
        "SELECT current_user, current_database(),"
        " has_database_privilege(current_database(), 'CREATE')"
    ).fetchone()
    assert row is not None
    user, database, can_create = row
    if not can_create:
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


def _first_line(exc: BaseException | None) -> str:
    return str(exc).strip().splitlines()[0] if exc and str(exc).strip() else repr(exc)


logging.getLogger("psycopg").setLevel(logging.ERROR)
