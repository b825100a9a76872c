"""`make demo`: the job end to end on a throwaway PostgreSQL seeded with the demo data.

Publishes ./storage/sanitised.dump, then removes the server. DEMO_PG_MAJOR picks the
major (default 17).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg

from app.cluster import Cluster, pick_free_port
from tests import pgbin
from tests.seed import demo

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    major = int(os.environ.get("DEMO_PG_MAJOR", "17"))
    storage = REPO / "storage"
    storage.mkdir(exist_ok=True)
    bindir = pgbin.bindir(major)
    with tempfile.TemporaryDirectory(prefix="sdump-demo-") as root:
        os.chmod(root, 0o755)
        with Cluster(bindir, Path(root) / "data", pick_free_port()) as cluster:
            with psycopg.connect(cluster.url(), autocommit=True) as conn:
                conn.execute("CREATE DATABASE demo")
            with psycopg.connect(cluster.url("demo")) as conn:
                demo.load(conn)
            print(f"demo database seeded on PostgreSQL {major} at {cluster.url('demo')}")
            env = {
                **os.environ,
                "DATABASE_URL": cluster.url("demo"),
                "STORAGE_DIR": str(storage),
                "PG_DUMP": str(bindir / "pg_dump"),
                "LOG_FORMAT": os.environ.get("LOG_FORMAT", "text"),
            }
            code = subprocess.call([sys.executable, "-m", "app", "dump"], env=env, cwd=REPO)
    if code == 0:
        dump = storage / "sanitised.dump"
        print(f"\npublished {dump} ({dump.stat().st_size} bytes)")
        print(
            f"restore it into an empty database under the original names:\n"
            f"  PG_RESTORE={bindir / 'pg_restore'} {sys.executable} -m app restore "
            f"--dump {dump} --target postgresql://<user>@<host>/<empty db>"
        )
    return code


if __name__ == "__main__":
    sys.exit(main())
