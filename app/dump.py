"""pg_dump: found and version-checked at start, run without a shell, password in env only."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from app.db import CHECK_INTERVAL
from app.errors import JobError, PgDumpError
from app.log import log

_VERSION = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")
_PR_SET_PDEATHSIG = 1
# Measured (docs/performance.md): zstd level 1 dumps fastest of all at about gzip's size.
# Older pg_dump has gzip only; level 1 is much faster than its default of 6, a bit larger.
DEFAULT_COMPRESSION = "zstd:1"
DEFAULT_COMPRESSION_BEFORE_16 = "gzip:1"


@dataclass(frozen=True)
class PgDump:
    path: str
    major: int
    version: str


def client_version(binary: str, variable: str, error: type[JobError]) -> tuple[str, int, str]:
    """Resolve a PostgreSQL client program once: (path, major, `--version` text)."""
    path = shutil.which(binary)
    if path is None:
        name = Path(binary).name
        raise error(f"{name} not found: {binary!r} (set {variable} or install the client)")
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise error(f"{path} --version failed: {exc}") from None
    match = _VERSION.search(out)
    if not match:
        raise error(f"cannot read the version of {path}: {out.strip()!r}")
    return path, int(match.group(1)), out.strip()


def find(binary: str, server_major: int) -> PgDump:
    """Resolve pg_dump once and refuse one older than the server (SPEC §2, exit 5)."""
    path, major, version = client_version(binary, "PG_DUMP", PgDumpError)
    if major < server_major:
        raise PgDumpError(
            f"pg_dump {major} ({path}) is older than the server ({server_major}): use a "
            f"pg_dump of major {server_major} or newer (PG_DUMP, or the image's PG_MAJOR)"
        )
    return PgDump(path=path, major=major, version=version)


def compression(setting: str | None, pg_dump: PgDump) -> str:
    """The compression the dump is written with: DUMP_COMPRESSION, or the default for this
    pg_dump. lz4 and zstd need pg_dump 16 or newer (exit 5, naming the variable)."""
    if setting is None:
        return DEFAULT_COMPRESSION if pg_dump.major >= 16 else DEFAULT_COMPRESSION_BEFORE_16
    method = setting.partition(":")[0]
    if method in ("lz4", "zstd") and pg_dump.major < 16:
        raise PgDumpError(
            f"DUMP_COMPRESSION={setting} needs pg_dump 16 or newer, and {pg_dump.path} is "
            f"{pg_dump.major}: use gzip or none, or a newer pg_dump (PG_DUMP)"
        )
    return setting


def compress_flags(value: str, major: int) -> list[str]:
    """pg_dump 16 takes METHOD[:LEVEL]; older ones take a gzip level, 0 for none."""
    if major >= 16:
        return [f"--compress={value}"]
    method, _, level = value.partition(":")
    if method == "none":
        return ["--compress=0"]
    return [f"--compress={level}"] if level else []


def child_env(database_url: str | None, application_name: str) -> tuple[str | None, dict[str, str]]:
    """The --dbname conninfo without the password, and the child's environment with it.

    pg_dump's server session checks that its client is alive, so that a pg_dump killed with
    the job (while it waits for a lock, say) does not keep the scratch tables locked."""
    env = dict(os.environ)
    env.pop("DATABASE_URL", None)
    env["PGAPPNAME"] = application_name
    check = f"-c client_connection_check_interval={CHECK_INTERVAL}"
    env["PGOPTIONS"] = f"{env.get('PGOPTIONS', '')} {check}".strip()
    if database_url is None:
        return None, env
    params = conninfo_to_dict(database_url)
    password = params.pop("password", None)
    if password is not None:
        env["PGPASSWORD"] = str(password)
    if params.get("options"):
        params["options"] = f"{params['options']} {check}"
    params.setdefault("application_name", application_name)
    return make_conninfo(**{k: str(v) for k, v in params.items()}), env


def pattern(name: str) -> str:
    """A pg_dump name pattern matching exactly `name`: quoted, quotes doubled."""
    return '"' + name.replace('"', '""') + '"'


def run(
    pg_dump: PgDump,
    database_url: str | None,
    application_name: str,
    schema: str | None,
    extensions: list[str],
    output: Path,
    extra: list[str] | None = None,
    compression: str | None = None,
) -> float:
    """Dump the scratch schema (None: the whole scratch database) into `output`; return
    the seconds it took."""
    dbname, env = child_env(database_url, application_name)
    args = [
        pg_dump.path,
        "--format=custom",
        "--no-owner",
        "--no-acl",
        *([f"--schema={pattern(schema)}"] if schema is not None else []),
        f"--file={output}",
        *[f"--extension={pattern(e)}" for e in extensions],
        *(compress_flags(compression, pg_dump.major) if compression else []),
        *(extra or []),
    ]
    if dbname is not None:
        args.append(f"--dbname={dbname}")
    started = time.monotonic()
    process = subprocess.Popen(
        args,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=_die_with_parent,
    )
    try:
        _, stderr = process.communicate()
    except BaseException:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        raise
    seconds = time.monotonic() - started
    if process.returncode != 0:
        message = stderr.decode(errors="replace").strip()[-2000:]
        raise PgDumpError(f"pg_dump failed (exit {process.returncode}): {message}")
    log.debug("pg_dump finished", extra={"seconds": round(seconds, 3)})
    return seconds


def _die_with_parent() -> None:
    """Linux: the kernel kills pg_dump if the job dies, so it never writes on alone."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
