"""A throwaway PostgreSQL server as the scratch database (`SCRATCH_DATABASE_URL=embedded`).

The job starts it in a data directory under STORAGE_DIR, copies into it exactly as into
any scratch database, dumps it, and removes it whatever happens; a run that was killed
leaves it to the next run, which stops and removes it first. An exclusive `flock` on a
lock file in STORAGE_DIR (one per DUMP_NAME) keeps two containers that share the volume
from using the same directory: the server's own advisory lock would not, since each
container has a server of its own. As root, the server runs as the `postgres` user.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import psycopg

from app.cluster import Cluster, ClusterError, pick_free_port
from app.config import Config
from app.errors import ConfigError, DatabaseError, LockHeld
from app.log import log
from app.plan import Plan
from app.scratch import DumpSource, Inspect
from app.scratchdb import ScratchDatabase
from app.scrub import TableResult

DATA_PREFIX = "tmp-sanitised-scratch-"
_PROGRAMS = ("initdb", "pg_ctl", "postgres")
# A scratch server keeps nothing: no crash safety, no WAL beyond what recovery needs.
SETTINGS = {
    "wal_level": "minimal",
    "max_wal_senders": "0",
    "full_page_writes": "off",
    "synchronous_commit": "off",
    "autovacuum": "off",
    "maintenance_work_mem": "128MB",
    "max_connections": "20",
}


class EmbeddedScratch:
    mode = "embedded"
    writes_source = False

    def __init__(self, config: Config, source: psycopg.Connection[Any]) -> None:
        self.config = config
        self.source = source
        self.bindir = find_bindir(config)
        self.root = config.storage_dir / f"{DATA_PREFIX}{config.dump_name}"
        self.lock_path = config.storage_dir / f".sanitised-dump-{config.dump_name}.lock"
        self.lock_fd: int | None = None
        try:
            self.cluster = Cluster(self.bindir, self.root / "data", pick_free_port())
        except KeyError:
            raise ConfigError(
                f"the job's uid {os.geteuid()} has no passwd entry, which initdb needs: run "
                "the job as a user that has one, or use SCRATCH_DATABASE_URL=<url>"
            ) from None
        self.started = False
        self.database: ScratchDatabase | None = None
        self.restore_like_source = False

    @property
    def stages(self) -> dict[str, float]:
        return self.database.stages if self.database is not None else {}

    def server_major(self) -> int:
        try:
            return self.cluster.major
        except (OSError, subprocess.CalledProcessError, ClusterError) as exc:
            raise ConfigError(f"cannot run {self.bindir / 'postgres'}: {exc}") from None

    def prepare(self) -> None:
        self._lock()
        if self.root.exists():
            log.warning("removing a leftover embedded server", extra={"path": str(self.root)})
            _remove(Cluster(self.bindir, self.root / "data", 0), self.root)
        self.root.mkdir(mode=0o700)
        try:
            self.cluster.init(settings=SETTINGS, unix_socket=False)
            self.started = True
            self.cluster.start()
        except ClusterError as exc:
            raise DatabaseError(f"cannot start the embedded server: {exc}") from None
        log.info(
            "embedded server started",
            extra={"path": str(self.root), "major": self.cluster.major, "bindir": str(self.bindir)},
        )
        # hostaddr and sslmode spelled out, so that no PG* variable meant for the source
        # (PGHOSTADDR, PGSSLMODE) sends this connection anywhere else.
        url = (
            f"postgresql://postgres@127.0.0.1:{self.cluster.port}/postgres"
            "?hostaddr=127.0.0.1&sslmode=disable&gssencmode=disable"
        )
        self.database = ScratchDatabase(self.config, url, self.source, self.mode)
        self.database.restore_like_source = self.restore_like_source
        self.database.prepare()

    def build(
        self,
        source: psycopg.Connection[Any],
        plan: Plan,
        allow_list_sha256: str,
        inspect: Inspect,
    ) -> list[TableResult]:
        assert self.database is not None
        return self.database.build(source, plan, allow_list_sha256, inspect)

    def reset(self) -> None:
        if self.database is not None:
            self.database.reset()

    def dump_source(self) -> DumpSource:
        assert self.database is not None
        return self.database.dump_source()

    def rewrite_dump(self, path: Path) -> None:
        assert self.database is not None
        self.database.rewrite_dump(path)

    def close(self) -> None:
        """Stop the server and remove its directory; then let the next run in."""
        if self.lock_fd is None:
            return  # another run's directory: not ours to touch
        try:
            if self.database is not None:
                for conn in (self.database.conn, self.database.lock_conn):
                    if conn is not None:
                        conn.close()
            if self.started or self.root.exists():
                _remove(self.cluster, self.root)
                log.info("embedded server removed", extra={"path": str(self.root)})
        except (OSError, ClusterError) as exc:
            log.error(
                "could not remove the embedded server; the next run removes it",
                extra={"path": str(self.root), "error": str(exc)},
            )
        finally:
            os.close(self.lock_fd)
            self.lock_fd = None

    def _lock(self) -> None:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockHeld(
                f"another run holds {self.lock_path} (DUMP_NAME={self.config.dump_name} in "
                "the same STORAGE_DIR): wait for it to finish"
            ) from None
        self.lock_fd = fd


def _remove(cluster: Cluster, root: Path) -> None:
    try:
        cluster.destroy()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def find_bindir(config: Config) -> Path:
    """initdb, pg_ctl and postgres: PG_BINDIR, else beside PG_DUMP, else `pg_config
    --bindir`, else Debian's /usr/lib/postgresql/<major>/bin (the newest)."""
    if config.pg_bindir:
        path = Path(config.pg_bindir)
        if not _has_server(path):
            raise ConfigError(
                f"PG_BINDIR {path} lacks {', '.join(_PROGRAMS)}: point it at a PostgreSQL "
                "server's bin directory"
            )
        return path
    candidates: list[Path] = []
    pg_dump = shutil.which(config.pg_dump)
    if pg_dump:
        candidates.append(Path(os.path.realpath(pg_dump)).parent)
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=30, check=True
            ).stdout.strip()
            candidates.append(Path(out))
        except (OSError, subprocess.SubprocessError):
            pass
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    for path in [*candidates, *debian]:
        if _has_server(path):
            return path
    raise ConfigError(
        "SCRATCH_DATABASE_URL=embedded needs a PostgreSQL server (initdb, pg_ctl, postgres): "
        "install one or set PG_BINDIR to its bin directory"
    )


def _has_server(path: Path) -> bool:
    return all(os.access(path / name, os.X_OK) for name in _PROGRAMS)
