"""Errors a user can act on, one class per stage, each with its exit code (SPEC §2)."""

from __future__ import annotations


class JobError(Exception):
    """Root of every error the job expects; `__main__` turns it into a log line and an exit code."""

    exit_code = 1


class ConfigError(JobError):
    """Environment, allow list file or storage folder is wrong."""

    exit_code = 2


class AllowListMismatch(JobError):
    """The allow list does not fit the database: missing table or column, unfakeable type,
    a CHECK that rejects a fake."""

    exit_code = 3


class DatabaseError(JobError):
    """The database could not be reached or a statement failed."""

    exit_code = 4


class PgDumpError(JobError):
    """pg_dump is missing, too old for the server, or failed."""

    exit_code = 5


class PgRestoreError(PgDumpError):
    """pg_restore is missing, too old for the dump, or failed (the same exit code as pg_dump)."""


class PublishError(JobError):
    """The finished dump could not be moved into place."""

    exit_code = 6


class LockHeld(JobError):
    """Another run holds the advisory lock."""

    exit_code = 7


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived.

    A KeyboardInterrupt so that psycopg cancels the running query on its way out.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
