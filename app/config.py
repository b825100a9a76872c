"""Configuration, read once from the environment into a frozen dataclass (SPEC §2)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict

from app.errors import ConfigError

DEFAULT_ALLOW_LIST = Path(__file__).resolve().parent.parent / "allow_list.json"
_DURATION = re.compile(r"^\d+(\.\d+)?\s*(us|ms|s|min|h|d)?$")
_SIZE = re.compile(r"^(\d+)\s*([kKmMgGtT]?)(i?[bB])?$")
MIN_KEY_BYTES = 16
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
# pg_dump's --compress methods and the levels each accepts.
COMPRESSION_LEVELS = {"none": None, "gzip": (1, 9), "lz4": (1, 12), "zstd": (1, 22)}
EMBEDDED = "embedded"


@dataclass(frozen=True)
class Config:
    database_url: str | None
    allow_list: Path
    storage_dir: Path
    dump_name: str
    scratch_schema: str
    log_format: str
    log_level: str
    pg_dump: str
    pg_restore: str
    lock_timeout: str
    max_scratch_bytes: int | None
    connect_attempts: int
    connect_wait: float
    application_name: str
    scan: str = "warn"
    scan_rows: int = 1000
    pseudonym_key: str | None = field(default=None, repr=False)
    scratch_database_url: str | None = None  # None: scratch schema on the source
    pg_bindir: str | None = None  # where initdb and postgres are, for the embedded server
    dump_compression: str | None = None  # None: the default for the pg_dump found (app.dump)
    copy_connections: int = 2
    scratch_unlogged: bool = True

    @property
    def mode(self) -> str:
        """Where the copy is made: `schema` (on the source), `database` or `embedded`."""
        if self.scratch_database_url is None:
            return "schema"
        return "embedded" if self.scratch_database_url == EMBEDDED else "database"

    @property
    def dump_path(self) -> Path:
        return self.storage_dir / self.dump_name

    def describe(self) -> dict[str, object]:
        """Settings for the start log line: no connection string, so no secret."""
        return {
            "database_url_set": self.database_url is not None,
            "allow_list": str(self.allow_list),
            "storage_dir": str(self.storage_dir),
            "dump_name": self.dump_name,
            "scratch_schema": self.scratch_schema,
            "pg_dump": self.pg_dump,
            "lock_timeout": self.lock_timeout,
            "max_scratch_bytes": self.max_scratch_bytes,
            "connect_attempts": self.connect_attempts,
            "dump_compression": self.dump_compression,
            "copy_connections": self.copy_connections,
            "scratch_unlogged": self.scratch_unlogged,
            "scan": self.scan,
            "scan_rows": self.scan_rows,
            "pseudonym_key_set": self.pseudonym_key is not None,
            "mode": self.mode,
        }


def load(env: Mapping[str, str] | None = None) -> Config:
    """Read and validate every variable; a bad one raises ConfigError naming it."""
    env = os.environ if env is None else env

    def get(name: str, default: str) -> str:
        value = env.get(name, "").strip()
        return value or default

    log_format = get("LOG_FORMAT", "json").lower()
    if log_format not in ("json", "text"):
        raise ConfigError(f"LOG_FORMAT must be 'json' or 'text', not {log_format!r}")
    log_level = get("LOG_LEVEL", "INFO").upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, not {log_level!r}")

    dump_name = get("DUMP_NAME", "sanitised.dump")
    if "/" in dump_name or dump_name in (".", "..") or dump_name.startswith("tmp-sanitised-dump"):
        raise ConfigError(f"DUMP_NAME must be a plain file name, not {dump_name!r}")

    scratch = get("SCRATCH_SCHEMA", "temp_scrubbed_schema")
    if (
        len(scratch.encode()) > 63
        or scratch.lower().startswith("pg_")
        or scratch in ("public", "information_schema")
        or "\x00" in scratch
    ):
        raise ConfigError(
            f"SCRATCH_SCHEMA {scratch!r} is not usable: at most 63 bytes, not public, "
            "information_schema or pg_*"
        )

    lock_timeout = get("LOCK_TIMEOUT", "5s")
    if not _DURATION.match(lock_timeout):
        raise ConfigError(f"LOCK_TIMEOUT must be a duration like 5s or 500ms, not {lock_timeout!r}")

    scratch_url = env.get("SCRATCH_DATABASE_URL", "").strip() or None
    if scratch_url is not None and scratch_url.lower() == EMBEDDED:
        scratch_url = EMBEDDED
    elif scratch_url is not None:
        try:
            conninfo_to_dict(scratch_url)
        except psycopg.ProgrammingError:
            raise ConfigError(
                "SCRATCH_DATABASE_URL is neither 'embedded' nor a libpq URI or conninfo string"
            ) from None

    scan = get("SCAN", "warn").lower()
    if scan not in ("warn", "fail", "off"):
        raise ConfigError(f"SCAN must be 'warn', 'fail' or 'off', not {scan!r}")

    pseudonym_key = env.get("PSEUDONYM_KEY") or None
    if pseudonym_key is not None and len(pseudonym_key.encode()) < MIN_KEY_BYTES:
        raise ConfigError(
            f"PSEUDONYM_KEY must be at least {MIN_KEY_BYTES} bytes (a long random secret, "
            "e.g. from `openssl rand -hex 32`); the one set is shorter"
        )

    return Config(
        database_url=_database_url(env),
        allow_list=Path(get("ALLOW_LIST", str(DEFAULT_ALLOW_LIST))),
        storage_dir=Path(get("STORAGE_DIR", "/storage")),
        dump_name=dump_name,
        scratch_schema=scratch,
        log_format=log_format,
        log_level=log_level,
        pg_dump=get("PG_DUMP", "pg_dump"),
        pg_restore=get("PG_RESTORE", "pg_restore"),
        lock_timeout=lock_timeout,
        max_scratch_bytes=_size(env, "MAX_SCRATCH_BYTES"),
        connect_attempts=_number(env, "CONNECT_ATTEMPTS", 5, int),
        connect_wait=_number(env, "CONNECT_WAIT", 2.0, float),
        application_name=get("APPLICATION_NAME", "sanitised-dump"),
        scan=scan,
        scan_rows=_number(env, "SCAN_ROWS", 1000, int),
        pseudonym_key=pseudonym_key,
        scratch_database_url=scratch_url,
        pg_bindir=env.get("PG_BINDIR", "").strip() or None,
        dump_compression=_compression(env, "DUMP_COMPRESSION"),
        copy_connections=_number(env, "COPY_CONNECTIONS", 2, int, most=16),
        scratch_unlogged=_flag(env, "SCRATCH_UNLOGGED", True),
    )


def _database_url(env: Mapping[str, str]) -> str | None:
    """Parsed once here, so that a malformed one is a configuration error (exit 2) whose
    message quotes none of it: libpq's parse errors quote the offending token, which may be
    the password."""
    url = env.get("DATABASE_URL") or None
    if url is not None:
        try:
            conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            problem = re.sub(r'"[^"]*"', '"..."', str(exc).strip().splitlines()[0])
            raise ConfigError(
                f"DATABASE_URL is not a libpq URI or conninfo string ({problem}); "
                "its text is not shown because it may hold the password"
            ) from None
    return url


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("true", "yes", "on", "1"):
        return True
    if raw in ("false", "no", "off", "0"):
        return False
    raise ConfigError(f"{name} must be true or false, not {raw!r}")


def _compression(env: Mapping[str, str], name: str) -> str | None:
    """`method` or `method:level`, as pg_dump's --compress takes it; unset: None."""
    raw = env.get(name, "").strip().lower()
    if not raw:
        return None
    method, _, level = raw.partition(":")
    problem = (
        f"{name} must be none, gzip, lz4 or zstd, optionally with a level (zstd:3), not {raw!r}"
    )
    if method not in COMPRESSION_LEVELS:
        raise ConfigError(problem)
    if not level:
        return method
    bounds = COMPRESSION_LEVELS[method]
    if bounds is None or not level.isdigit() or not bounds[0] <= int(level) <= bounds[1]:
        where = f"{bounds[0]} to {bounds[1]}" if bounds else "none"
        raise ConfigError(f"{problem}: levels of {method} are {where}")
    return f"{method}:{int(level)}"


def _size(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    match = _SIZE.match(raw)
    if not match:
        raise ConfigError(
            f"{name} must be a size in bytes like 500000000, 20GB or 20GiB, not {raw!r}"
        )
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def _number[T: (int, float)](
    env: Mapping[str, str], name: str, default: T, kind: type[T], most: T | None = None
) -> T:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, not {raw!r}") from None
    if value <= 0:
        raise ConfigError(f"{name} must be greater than 0, not {raw!r}")
    if most is not None and value > most:
        raise ConfigError(f"{name} must be at most {most}, not {raw!r}")
    return value
