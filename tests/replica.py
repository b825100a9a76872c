"""A primary and a hot standby streaming from it, both throwaway clusters.

The standby is made with `pg_basebackup` (of the same major) and a `primary_conninfo`
written here: the one `-R` writes may carry options an older system libpq rejects.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg

from app.cluster import Cluster, pick_free_port


@dataclass
class Pair:
    primary: Cluster
    standby: Cluster

    def sync(self, timeout: float = 60) -> None:
        """Wait until the standby has replayed everything the primary wrote so far."""
        with psycopg.connect(self.primary.url(), autocommit=True) as conn:
            lsn = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]  # type: ignore[index]
        deadline = time.monotonic() + timeout
        with psycopg.connect(self.standby.url(), autocommit=True) as conn:
            while True:
                done = conn.execute(
                    "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", [lsn]
                ).fetchone()[0]  # type: ignore[index]
                if done:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"standby did not replay up to {lsn}")
                time.sleep(0.05)

    def set_standby(self, **settings: str) -> None:
        """Change settings of the standby and reload it."""
        lines = "".join(f"{name} = '{value}'\n" for name, value in settings.items())
        with (self.standby.datadir / "postgresql.conf").open("a", encoding="utf-8") as f:
            f.write(lines)
        with psycopg.connect(self.standby.url(), autocommit=True) as conn:
            conn.execute("SELECT pg_reload_conf()")
            for name, value in settings.items():
                deadline = time.monotonic() + 10
                while conn.execute("SELECT current_setting(%s)", [name]).fetchone()[0] != value:  # type: ignore[index]
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"standby did not take {name} = {value}")
                    time.sleep(0.05)


@contextmanager
def pair(bindir: Path, root: Path) -> Iterator[Pair]:
    """Start a primary (data checksums on) and a hot standby of it; destroy both after."""
    primary = Cluster(bindir, root / "primary", pick_free_port())
    standby = Cluster(bindir, root / "standby", pick_free_port())
    primary.init(checksums=True)
    try:
        primary.start()
        _base_backup(primary, standby)
        standby.start()
        yield Pair(primary, standby)
    finally:
        standby.destroy()
        primary.destroy()


def _base_backup(primary: Cluster, standby: Cluster) -> None:
    assert primary.user is not None
    account = pwd.getpwnam(primary.user)
    for directory in (standby.datadir, standby.rundir):
        directory.mkdir(mode=0o700)
        os.chown(directory, account.pw_uid, account.pw_gid)
    standby.rundir.chmod(0o755)
    as_user = {}
    if account.pw_uid != os.geteuid():
        as_user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    subprocess.run(
        [
            str(primary.bindir / "pg_basebackup"),
            *("-D", str(standby.datadir), "-d", primary.url()),
            *("-X", "stream", "--checkpoint=fast", "--no-sync"),
        ],
        cwd=standby.datadir.parent,
        check=True,
        capture_output=True,
        timeout=300,
        **as_user,  # type: ignore[arg-type]
    )
    conninfo = f"host=127.0.0.1 port={primary.port} user=postgres application_name=standby"
    settings = {
        "port": str(standby.port),
        "unix_socket_directories": str(standby.rundir),
        "primary_conninfo": conninfo,
        "hot_standby": "on",
        "hot_standby_feedback": "off",
    }
    with (standby.datadir / "postgresql.conf").open("a", encoding="utf-8") as f:
        f.write("".join(f"{k} = '{v}'\n" for k, v in settings.items()))
    signal = standby.datadir / "standby.signal"
    signal.touch()
    os.chown(signal, account.pw_uid, account.pw_gid)
