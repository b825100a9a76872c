"""pg_dump archives on disk: the header, a pg_restore that can read them, and one table's data.

The header is read here rather than by pg_restore so that a pg_restore too old for the
archive is refused with the version it needs, and a file that is no archive at all with
a plain message, before pg_restore prints its own.
"""

from __future__ import annotations

import re
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from app.dump import _die_with_parent, client_version
from app.errors import ConfigError, PgRestoreError

MAGIC = b"PGDMP"
_FORMATS = {1: "custom", 3: "tar", 5: "directory"}
_ALGORITHMS = {0: "none", 1: "gzip", 2: "lz4", 3: "zstd"}
_VERSION = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")
_MAJOR = re.compile(r"^(\d+)(?:\.(\d+))?")
_COPY_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}


@dataclass(frozen=True)
class Header:
    """What the archive says about itself (pg_backup_archiver.c, ReadHead)."""

    archive_version: str  # "1.16"
    format: str  # custom, directory, tar
    compression: str  # none, gzip, lz4, zstd
    database: str | None
    server_version: str | None
    pg_dump_version: str | None

    @property
    def pg_dump_major(self) -> int | None:
        return _major(self.pg_dump_version)


@dataclass(frozen=True)
class PgRestore:
    path: str
    major: int
    version: str


@dataclass(frozen=True)
class Entry:
    """One line of `pg_restore --list`."""

    dump_id: int
    line: str


def read_header(path: Path) -> Header:
    """Read the header of a custom, directory or tar archive; ConfigError for anything else."""
    try:
        head = _header_bytes(path)
    except OSError as exc:
        raise ConfigError(f"cannot read the dump {path}: {exc.strerror or exc}") from None
    if not head.startswith(MAGIC):
        if head.lstrip().startswith(b"--") or b"PostgreSQL database dump" in head:
            raise ConfigError(
                f"{path} is a plain SQL script, not a sanitised dump: this job writes "
                "pg_dump archives (custom format) with a manifest inside"
            )
        raise ConfigError(
            f"{path} is not a sanitised dump: it is no pg_dump archive (no PGDMP header)"
        )
    try:
        return _parse(head)
    except (IndexError, ValueError):
        raise ConfigError(f"{path} is not a sanitised dump: its header is damaged") from None


def _header_bytes(path: Path) -> bytes:
    if path.is_dir():
        path = path / "toc.dat"
    with path.open("rb") as handle:
        head = handle.read(4096)
    if not head.startswith(MAGIC):
        try:
            with tarfile.open(path) as tar:
                member = tar.extractfile("toc.dat")
                if member is not None:
                    return member.read(4096)
        except (tarfile.TarError, EOFError, KeyError, OSError):
            pass  # not a tar archive of pg_dump's
    return head


def _parse(head: bytes) -> Header:
    at = len(MAGIC)
    vmaj, vmin = head[at], head[at + 1]
    at += 2
    if vmaj > 1 or vmin > 0:
        at += 1  # revision
    version = (vmaj, vmin)
    int_size = head[at]
    at += 2 if version >= (1, 7) else 1  # integer size, offset size
    fmt = head[at]
    at += 1

    def read_int() -> int:
        nonlocal at
        sign = head[at]
        value = int.from_bytes(head[at + 1 : at + 1 + int_size], "little")
        at += 1 + int_size
        return -value if sign else value

    def read_str() -> str | None:
        nonlocal at
        length = read_int()
        if length < 0:
            return None
        text = head[at : at + length].decode("utf-8", errors="replace")
        at += length
        return text

    if version >= (1, 15):
        compression = _ALGORITHMS.get(head[at], f"unknown ({head[at]})")
        at += 1
    elif version >= (1, 4):
        compression = "none" if read_int() == 0 else "gzip"
    else:
        raise ValueError("archive older than pg_dump 7.1")
    for _ in range(7):  # the time it was made: sec, min, hour, day, month, year, isdst
        read_int()
    database = read_str()
    server = dumper = None
    if version >= (1, 10):
        server, dumper = read_str(), read_str()
    return Header(
        archive_version=f"{vmaj}.{vmin}",
        format=_FORMATS.get(fmt, f"unknown ({fmt})"),
        compression=compression,
        database=database,
        server_version=server,
        pg_dump_version=dumper,
    )


def _major(version: str | None) -> int | None:
    match = _MAJOR.match(version or "")
    if not match:
        return None
    major = int(match.group(1))
    return major if major >= 10 else 9  # 9.6 and older all predate pg_restore 10


def find(binary: str, header: Header) -> PgRestore:
    """Resolve pg_restore and refuse one older than the pg_dump that wrote the archive:
    PostgreSQL only promises that pg_restore reads archives of its own major and older."""
    path, major, version = client_version(binary, "PG_RESTORE", PgRestoreError)
    needed = header.pg_dump_major
    if needed is not None and major < needed:
        raise PgRestoreError(
            f"the dump was written by pg_dump {header.pg_dump_version} (archive "
            f"{header.archive_version}, {header.compression}); pg_restore {major} ({path}) "
            f"cannot read it: use pg_restore {needed} or newer (PG_RESTORE), or run restore "
            "from the image"
        )
    return PgRestore(path=path, major=major, version=version)


def entries(pg_restore: PgRestore, dump: Path) -> list[Entry]:
    """The archive's table of contents, one entry per line."""
    out = _run([pg_restore.path, "--list", str(dump)], "list")
    found = []
    for line in out.splitlines():
        head, sep, _ = line.partition(";")
        if sep and head.isdigit():
            found.append(Entry(int(head), line))
    return found


def table_data(pg_restore: PgRestore, dump: Path, entry: Entry) -> list[str]:
    """The rows of one TABLE DATA entry as COPY prints them (text format, still escaped)."""
    with tempfile.NamedTemporaryFile("w", suffix=".list", encoding="utf-8") as listing:
        listing.write(entry.line + "\n")
        listing.flush()
        script = _run(
            [pg_restore.path, f"--use-list={listing.name}", "--file=-", str(dump)], "read"
        )
    lines = iter(script.splitlines())
    for line in lines:
        if line.startswith("COPY "):
            break
    rows: list[str] = []
    for line in lines:
        if line == "\\.":
            return rows
        rows.append(line)
    raise PgRestoreError(f"pg_restore printed no data for entry {entry.line!r} of {dump}")


def copy_field(text: str) -> str:
    """Undo COPY's text-format escaping of one field."""
    return re.sub(r"\\(.)", lambda m: _COPY_ESCAPES.get(m.group(1), m.group(1)), text)


def _run(args: list[str], what: str) -> str:
    try:
        proc = subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=600,
            check=False,
            preexec_fn=_die_with_parent,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise PgRestoreError(f"pg_restore could not {what} the dump: {exc}") from None
    if proc.returncode != 0:
        message = proc.stderr.decode(errors="replace").strip()[-2000:]
        raise PgRestoreError(f"pg_restore could not {what} the dump: {message}")
    return proc.stdout.decode("utf-8", errors="replace")
