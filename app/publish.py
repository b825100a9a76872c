"""The atomic file move: a failed run never touches the published dump (SPEC §1.5)."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from app.errors import ConfigError, PublishError

TEMP_PREFIX = "tmp-sanitised-dump-"


@dataclass(frozen=True)
class Published:
    path: Path
    size: int
    sha256: str


def check_storage(storage_dir: Path) -> None:
    """Before anything touches the database: the folder exists and takes files."""
    if not storage_dir.is_dir():
        raise ConfigError(
            f"STORAGE_DIR {storage_dir} does not exist or is not a folder: mount a volume there"
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=TEMP_PREFIX + "probe-", dir=storage_dir)
    except OSError as exc:
        raise ConfigError(
            f"STORAGE_DIR {storage_dir} is not writable ({exc.strerror}): mount it read-write "
            "for the job's user"
        ) from None
    os.close(fd)
    os.unlink(probe)


def temp_prefix(dump_name: str) -> str:
    return f"{TEMP_PREFIX}{dump_name}-"


def remove_stale(storage_dir: Path, dump_name: str) -> list[Path]:
    """Temporary files of a killed run of this dump; call only while holding the lock.

    Only names `create_temp` makes for this DUMP_NAME: the random part has no '-', so the
    temp files of a dump named `<DUMP_NAME>-eu` (or of any other name) never match, and
    glob characters in DUMP_NAME mean nothing."""
    own = re.compile(re.escape(temp_prefix(dump_name)) + r"[a-z0-9_]{8}")
    removed = []
    for path in sorted(storage_dir.iterdir()):
        if own.fullmatch(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def create_temp(storage_dir: Path, dump_name: str) -> Path:
    fd, name = tempfile.mkstemp(prefix=temp_prefix(dump_name), dir=storage_dir)
    os.close(fd)
    return Path(name)


def publish(temp: Path, target: Path) -> Published:
    """fsync, chmod 600, rename onto the target, fsync the folder."""
    try:
        digest = hashlib.sha256()
        with temp.open("rb+") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, 0o600)
        size = temp.stat().st_size
        os.replace(temp, target)
        folder = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError as exc:
        raise PublishError(f"cannot publish {target}: {exc.strerror or exc}") from None
    return Published(path=target, size=size, sha256=digest.hexdigest())
