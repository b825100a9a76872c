"""A throwaway PostgreSQL cluster: initdb, start, stop, destroy.

Used by the integration tests, and meant for an embedded scratch server later.
It trades durability for speed (fsync off) and listens on loopback only.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

log = logging.getLogger(__name__)

SUPERUSER = "postgres"
# sun_path is 108 bytes on Linux, including the trailing NUL.
_MAX_SOCKET_PATH = 107
_SETTING_NAME = re.compile(r"^[a-z_][a-z0-9_.]*$")


class ClusterError(RuntimeError):
    """initdb, pg_ctl or the server itself failed; the message carries their output."""


def pick_free_port() -> int:
    """A loopback port that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Cluster:
    """One data directory and the server that runs on it.

    As root, initdb and the server run as `user` (default "postgres"), because
    PostgreSQL refuses to run as root.
    """

    bindir: Path
    datadir: Path
    port: int
    user: str | None = None

    def __post_init__(self) -> None:
        # The children run with another working directory, so paths must not be relative.
        self.bindir = Path(self.bindir).absolute()
        self.datadir = Path(self.datadir).absolute()
        if self.user is None:
            self.user = SUPERUSER if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name

    @property
    def rundir(self) -> Path:
        """Socket and server log; beside the data dir, so nothing lands in shared /tmp."""
        return self.datadir.with_name(self.datadir.name + ".run")

    @property
    def logfile(self) -> Path:
        return self.rundir / "server.log"

    @cached_property
    def major(self) -> int:
        """The major version of the server binaries, e.g. 17."""
        out = subprocess.run(
            [self.bindir / "postgres", "--version"], capture_output=True, text=True, check=True
        ).stdout
        match = re.search(r"\) (\d+)", out)
        if match is None:
            raise ClusterError(f"{self.bindir / 'postgres'} --version said {out!r}")
        return int(match.group(1))

    def url(self, dbname: str = "postgres", user: str = SUPERUSER) -> str:
        return f"postgresql://{quote(user, safe='')}@127.0.0.1:{self.port}/{quote(dbname, safe='')}"

    def init(
        self,
        *,
        checksums: bool = False,
        settings: dict[str, str] | None = None,
        unix_socket: bool = True,
    ) -> None:
        """Create the data dir with trust auth and append the scratch-server settings.

        Without `unix_socket` the server listens on loopback TCP only, so the data dir may
        be deeper than a socket path allows."""
        socket_path = self.rundir / f".s.PGSQL.{self.port}"
        if unix_socket and len(str(socket_path)) > _MAX_SOCKET_PATH:
            raise ClusterError(f"socket path {socket_path} is too long; use a shorter datadir")
        extra = dict(settings or {})
        for name in extra:
            if not _SETTING_NAME.match(name):
                raise ValueError(f"not a PostgreSQL setting name: {name!r}")
        account = self._account()
        self.datadir.mkdir(mode=0o700)
        self.rundir.mkdir(mode=0o755, exist_ok=True)  # other users' clients may use the socket
        for directory in (self.datadir, self.rundir):
            os.chown(directory, account.pw_uid, account.pw_gid)
        if self._switches_user():
            _grant_traverse(self.datadir.parent, account)
            _grant_traverse(self.bindir, account)

        # PostgreSQL 18 turned data checksums on by default; make the flag mean the same everywhere.
        if checksums:
            checksum_flag = ["--data-checksums"]
        else:
            checksum_flag = ["--no-data-checksums"] if self.major >= 18 else []
        self._run(
            "initdb",
            [
                *("-D", str(self.datadir), "-U", SUPERUSER, "--auth=trust"),
                *("-E", "UTF8", "--locale=C", "--no-sync", *checksum_flag),
            ],
        )
        conf = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.rundir) if unix_socket else "",
            "fsync": "off",
            "wal_level": "replica",
            "max_wal_senders": "4",
            **extra,
        }
        lines = [f"{name} = {_quote(value)}" for name, value in conf.items()]
        with (self.datadir / "postgresql.conf").open("a", encoding="utf-8") as f:
            f.write("\n# Added by app.cluster\n" + "\n".join(lines) + "\n")

    def start(self) -> None:
        """Start and wait until the server accepts connections; on failure, show its log."""
        try:
            self._run("pg_ctl", ["-D", str(self.datadir), "-l", str(self.logfile), "-w", "start"])
        except ClusterError as exc:
            # A start that timed out may have left a postmaster behind.
            self._run("pg_ctl", ["-D", str(self.datadir), "-m", "immediate", "stop"], check=False)
            tail = self.log_tail()
            raise ClusterError(f"{exc}\n--- tail of {self.logfile} ---\n{tail}") from None

    def stop(self, mode: str = "fast") -> None:
        """Stop the server if it runs; mode is pg_ctl's: smart, fast or immediate."""
        if self.is_running():
            self._run("pg_ctl", ["-D", str(self.datadir), "-m", mode, "-w", "stop"])

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def is_running(self) -> bool:
        status = self._run("pg_ctl", ["-D", str(self.datadir), "status"], check=False)
        return status.returncode == 0

    def destroy(self) -> None:
        """Stop the server (immediately, if a fast stop fails) and remove its files."""
        if self.datadir.exists() and self.is_running():
            try:
                self.stop("fast")
            except ClusterError:
                log.warning("fast stop failed, stopping %s immediately", self.datadir)
                self.stop("immediate")
        for directory in (self.datadir, self.rundir):
            if directory.exists():
                shutil.rmtree(directory)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.logfile.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Cluster:
        self.init()
        try:
            self.start()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    def _account(self) -> pwd.struct_passwd:
        """The OS account to run as; as root, create the default one if it is missing."""
        assert self.user is not None  # set by __post_init__
        try:
            return pwd.getpwnam(self.user)
        except KeyError:
            if os.geteuid() != 0:
                raise ClusterError(f"OS user {self.user!r} does not exist") from None
        log.info("creating system user %s to run PostgreSQL", self.user)
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", self.user], check=True
        )
        return pwd.getpwnam(self.user)

    def _switches_user(self) -> bool:
        return self._account().pw_uid != os.geteuid()

    def _run(
        self, program: str, args: list[str], *, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, Any] = {}
        if self._switches_user():
            account = self._account()
            kwargs = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        argv = [str(self.bindir / program), *args]
        log.debug("running %s", argv)
        result = subprocess.run(
            argv,
            cwd=self.datadir.parent,  # the caller's cwd may be unreadable to the server's user
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=300,
            check=False,
            **kwargs,
        )
        if check and result.returncode != 0:
            raise ClusterError(
                f"{program} {' '.join(args)} exited with {result.returncode}:\n{result.stdout}"
            )
        return result


def _quote(value: str) -> str:
    """A postgresql.conf string literal; every setting accepts its value quoted."""
    return "'" + value.replace("'", "''") + "'"


def _grant_traverse(path: Path, account: pwd.struct_passwd) -> None:
    """Let `account` reach `path` by adding only the search (x) bit where it is missing."""
    groups = {account.pw_gid} | {g.gr_gid for g in grp.getgrall() if account.pw_name in g.gr_mem}
    for directory in (path, *path.parents):
        st = directory.stat()
        if st.st_uid == account.pw_uid:
            needed = stat.S_IXUSR
        elif st.st_gid in groups:
            needed = stat.S_IXGRP
        else:
            needed = stat.S_IXOTH
        if not st.st_mode & needed:
            log.info("adding search permission on %s for user %s", directory, account.pw_name)
            directory.chmod(stat.S_IMODE(st.st_mode) | needed)
