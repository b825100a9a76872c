"""Run the job the way users do (`python -m app`, configured by env) and inspect its dumps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

REPO = Path(__file__).resolve().parents[1]
SCRATCH = "temp_scrubbed_schema"


@dataclass
class Result:
    returncode: int
    stderr: str
    stdout: str

    @property
    def logs(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stderr.splitlines() if line.startswith("{")]

    def messages(self) -> str:
        return "\n".join(line.get("message", "") for line in self.logs)


def job_env(database_url: str, storage: Path, bindir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG") and k != "DATABASE_URL"}
    env.update(
        DATABASE_URL=database_url,
        STORAGE_DIR=str(storage),
        PG_DUMP=str(bindir / "pg_dump"),
        PG_RESTORE=str(bindir / "pg_restore"),
        LOG_FORMAT="json",
        CONNECT_ATTEMPTS="2",
        CONNECT_WAIT="0.1",
    )
    env.update(extra)
    return env


def run(env: Mapping[str, str], *args: str, timeout: float = 300) -> Result:
    proc = subprocess.run(
        [sys.executable, "-m", "app", *args],
        env=dict(env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return Result(proc.returncode, proc.stderr, proc.stdout)


def start(env: Mapping[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "app", *args],
        env=dict(env),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def restore(bindir: Path, dump: Path, target_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(bindir / "pg_restore"), "--exit-on-error", "--no-owner", "-d", target_url, str(dump)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def restore_script(bindir: Path, dump: Path) -> str:
    """The dump as SQL text: what a search for leaked values reads."""
    return subprocess.run(
        [str(bindir / "pg_restore"), "-f", "-", str(dump)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout


def schemas(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        return {r[0] for r in conn.execute("SELECT nspname FROM pg_namespace")}


def rows(url: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(query, params).fetchall()


def temp_files(storage: Path) -> list[Path]:
    return sorted(storage.glob("tmp-sanitised-dump-*"))
