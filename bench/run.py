"""The job against the raw `pg_dump -Fc` it replaces, on the same server, in the same run.

    make bench                                  # scales 0.25 0.5 1, 3 rounds each
    python -m bench.run --scale 0.25 --rounds 3 --out /tmp/try

A throwaway PostgreSQL 18 cluster with a production server's durability (fsync, full page
writes, checksums) is kept in --workdir between runs, one database per scale. Each round
runs every variant once, in an order that rotates from round to round, so that load from
elsewhere on the machine hits them all alike:

  A         pg_dump -Fc of exactly the allow-listed tables, pg_dump's default compression
  A_zstd1   the same with the compression the job uses (named after it)
  B         the job end to end: python -m app dump (scratch schema on the source)
  B_scratchdb  the same with SCRATCH_DATABASE_URL=same-server: the copy is built in an
            empty database of the benchmark's own cluster, the source is only read
  B_embedded   the same with SCRATCH_DATABASE_URL=embedded: a throwaway server of the
            job's own, under the storage folder

`same-server` is the benchmark's stand-in for the URL of that database (bench_scratch).
Results go to OUT.json (every run) and OUT.md (medians and ratios); docs/performance.md
explains them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from app.cluster import Cluster, pick_free_port
from bench import generate
from bench.rss import peak_rss
from tests import pgbin

REPO = Path(__file__).resolve().parents[1]
MAJOR = 18
SERVER_SETTINGS = {
    # What a small production server would run with; durability on, so WAL and I/O are honest.
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "shared_buffers": "1GB",
    "effective_cache_size": "4GB",
    "work_mem": "16MB",
    "maintenance_work_mem": "256MB",
    "max_wal_size": "8GB",
    "min_wal_size": "1GB",
    "checkpoint_timeout": "30min",
    "log_checkpoints": "on",
}
SAME_SERVER = "same-server"  # SCRATCH_DATABASE_URL: an empty database of the bench cluster
SCRATCH_DATABASE = "bench_scratch"


# The job in its three modes (README: "Three modes").
DEFAULT_JOBS = [
    "B",
    f"B_scratchdb:SCRATCH_DATABASE_URL={SAME_SERVER}",
    "B_embedded:SCRATCH_DATABASE_URL=embedded",
]


@dataclass
class Variant:
    name: str
    kind: str  # "pg_dump" or "job"
    args: list[str] = field(default_factory=list)  # pg_dump's extra flags
    env: dict[str, str] = field(default_factory=dict)  # the job's extra settings
    rev: str | None = None  # run the job of this git revision instead of the worktree's

    def describe(self) -> str:
        if self.kind == "pg_dump":
            return " ".join(["pg_dump -Fc", *self.args, "<listed tables>"])
        settings = " ".join(f"{k}={v}" for k, v in self.env.items())
        where = f" (at {self.rev})" if self.rev else ""
        return f"{settings} python -m app dump{where}".strip()


# -- the server ----------------------------------------------------------------------------


class Server:
    """The benchmark cluster in `workdir`, created on first use and kept for the next run."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        state = workdir / "cluster.json"
        datadir = workdir / "pg"
        if datadir.exists() and state.exists():
            port = json.loads(state.read_text())["port"]
            self.cluster = Cluster(pgbin.bindir(MAJOR), datadir, port)
        else:
            workdir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(datadir, ignore_errors=True)
            shutil.rmtree(workdir / "pg.run", ignore_errors=True)
            self.cluster = Cluster(pgbin.bindir(MAJOR), datadir, pick_free_port())
            self.cluster.init(checksums=True, settings=SERVER_SETTINGS)
            state.write_text(json.dumps({"port": self.cluster.port}))
        self.bindir = self.cluster.bindir

    def __enter__(self) -> Server:
        if not self.cluster.is_running():
            self.cluster.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cluster.stop()

    def url(self, dbname: str = "postgres") -> str:
        return self.cluster.url(dbname)

    def database(self, scale: float, say: Any) -> str:
        """The database of `scale`, generated unless a current one is already there."""
        name = "bench_s" + f"{scale:g}".replace(".", "_")
        url = self.url(name)
        with psycopg.connect(self.url(), autocommit=True) as admin:
            exists = admin.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", [name]
            ).fetchone()
        if exists:
            with psycopg.connect(url) as conn:
                if generate.is_current(conn, scale):
                    return url
            with psycopg.connect(self.url(), autocommit=True) as admin:
                admin.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))
        say(f"generating scale {scale:g} into {name}")
        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        generate.generate(url, scale, say)
        return url

    def settings(self) -> dict[str, str]:
        with psycopg.connect(self.url()) as conn:
            rows = conn.execute(
                "SELECT name, current_setting(name) FROM pg_settings"
                " WHERE name = ANY(%s) OR name = 'data_checksums' ORDER BY name",
                [[*SERVER_SETTINGS, "wal_level", "max_parallel_maintenance_workers"]],
            ).fetchall()
            version = conn.execute("SHOW server_version").fetchone()
        out = {name: value for name, value in rows}
        out["server_version"] = version[0] if version else "?"
        return out


# -- measuring one run ---------------------------------------------------------------------


class DiskWatch(threading.Thread):
    """Samples the allocated size of the data directory (WAL included) until stopped."""

    def __init__(self, path: Path, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.interval = interval
        self.start_bytes = size_on_disk(path)
        self.peak = self.start_bytes
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            self.peak = max(self.peak, size_on_disk(self.path))

    def finish(self) -> int:
        self._done.set()
        self.join()
        self.peak = max(self.peak, size_on_disk(self.path))
        return self.peak - self.start_bytes


def size_on_disk(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def wal_lsn(url: str) -> str:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
        assert row is not None
        return str(row[0])


def wal_bytes(url: str, start: str, end: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pg_wal_lsn_diff(%s::pg_lsn, %s::pg_lsn)", [end, start]
        ).fetchone()
        assert row is not None
        return int(row[0])


def checkpoint(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CHECKPOINT")


class PeakWatch(threading.Thread):
    """Samples the peak RSS (`VmHWM`) of a process and of every pg_dump under it until it
    ends. getrusage's ru_maxrss cannot tell: a child's count starts at the RSS of the
    process that forked it (Linux records the old memory's peak at exec), so it says the
    size of the benchmark, or of the job, for a small pg_dump."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.root = 0
        self.pg_dump = 0
        self._done = threading.Event()
        self.start()

    def run(self) -> None:
        while not self._done.is_set():
            self.sample()
            self._done.wait(self.interval)

    def sample(self) -> None:
        self.root = max(self.root, peak_rss(self.pid))
        for pid in _descendants(self.pid):
            if _comm(pid) == "pg_dump":
                self.pg_dump = max(self.pg_dump, peak_rss(pid))

    def wait(self, process: subprocess.Popen[bytes]) -> None:
        """Wait for the process, sampling until it exits."""
        process.wait()
        self._done.set()
        self.join()


def _comm(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/comm").read_text().strip()
    return ""


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                for child in (task / "children").read_text().split():
                    out += [int(child), *_descendants(int(child))]
    return out


@dataclass
class Context:
    server: Server
    source: str
    allow_list: Path
    storage: Path
    checkouts: dict[str, Path]
    restore: bool = False
    tables: tuple[str, ...] = generate.TABLES


def run_once(ctx: Context, variant: Variant) -> dict[str, Any]:
    checkpoint(ctx.server.url())
    admin = ctx.server.url()
    dump = ctx.storage / f"bench-{variant.name}.dump"
    dump.unlink(missing_ok=True)
    load = os.getloadavg()[0]
    lsn = wal_lsn(admin)
    disk = DiskWatch(ctx.server.cluster.datadir)
    disk.start()
    logs: list[dict[str, Any]] = []
    result: dict[str, Any] = {"variant": variant.name, "load1": round(load, 2)}
    started = time.monotonic()
    if variant.kind == "pg_dump":
        args = [str(ctx.server.bindir / "pg_dump"), "--format=custom"]
        args += [f"--table={t}" for t in ctx.tables]
        args += [*variant.args, f"--file={dump}", f"--dbname={ctx.source}"]
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        watch = PeakWatch(process.pid)
        assert process.stderr is not None
        with process.stderr:
            stderr = process.stderr.read().decode()
        watch.wait(process)
        seconds = time.monotonic() - started
        if process.returncode != 0:
            raise RuntimeError(f"pg_dump failed: {stderr}")
        result["rss_bytes"] = watch.root
    else:
        with tempfile.NamedTemporaryFile(suffix=".json") as peak_file:
            env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
            env.update(
                DATABASE_URL=ctx.source,
                ALLOW_LIST=str(ctx.allow_list),
                STORAGE_DIR=str(ctx.storage),
                DUMP_NAME=dump.name,
                PG_DUMP=str(ctx.server.bindir / "pg_dump"),
                LOG_FORMAT="json",
                **variant.env,
            )
            if env.get("SCRATCH_DATABASE_URL") == SAME_SERVER:
                env["SCRATCH_DATABASE_URL"] = scratch_database(ctx.server)
            cwd = ctx.checkouts.get(variant.rev or "", REPO)
            process = subprocess.Popen(
                [sys.executable, str(REPO / "bench" / "rss.py"), peak_file.name, "dump"],
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            watch = PeakWatch(process.pid)
            assert process.stderr is not None
            with process.stderr:
                stderr_text = process.stderr.read().decode()
            watch.wait(process)
            seconds = time.monotonic() - started
            if process.returncode != 0:
                raise RuntimeError(f"the job failed ({process.returncode}):\n{stderr_text}")
            peak = json.loads(Path(peak_file.name).read_text())
        logs = [json.loads(x) for x in stderr_text.splitlines() if x.startswith("{")]
        result["job_rss_bytes"] = peak["self"]
        result["pg_dump_rss_bytes"] = watch.pg_dump
        result["rss_bytes"] = max(peak["self"], watch.pg_dump)
        result["stages"] = stages(logs, seconds)
    result["peak_extra_disk_bytes"] = disk.finish()
    result["wal_bytes"] = wal_bytes(admin, lsn, wal_lsn(admin))
    result["seconds"] = round(seconds, 3)
    result["dump_bytes"] = dump.stat().st_size
    if ctx.restore and variant.kind == "job":
        result.update(restore(ctx, dump))
    dump.unlink()
    return result


def scratch_database(server: Server) -> str:
    """The URL of bench_scratch on the benchmark's cluster, created empty if missing (the
    job empties it at the start of a run and leaves it empty)."""
    with psycopg.connect(server.url(), autocommit=True) as conn:
        found = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", [SCRATCH_DATABASE]
        ).fetchone()
        if not found:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(SCRATCH_DATABASE)))
    return server.url(SCRATCH_DATABASE)


def restore(ctx: Context, dump: Path) -> dict[str, Any]:
    """The developer's side: pg_restore into an empty database of the same server, and,
    if the dump made its tables unlogged, the ALTER TABLE ... SET LOGGED that undoes it."""
    name = "bench_restore"
    admin = ctx.server.url()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    checkpoint(admin)
    lsn = wal_lsn(admin)
    started = time.monotonic()
    subprocess.run(
        [
            str(ctx.server.bindir / "pg_restore"),
            "--exit-on-error",
            "--no-owner",
            f"--dbname={ctx.server.url(name)}",
            str(dump),
        ],
        check=True,
        capture_output=True,
    )
    out: dict[str, Any] = {
        "restore_seconds": round(time.monotonic() - started, 3),
        "restore_wal_bytes": wal_bytes(admin, lsn, wal_lsn(admin)),
    }
    with psycopg.connect(ctx.server.url(name), autocommit=True) as conn:
        unlogged = conn.execute(
            "SELECT c.oid::regclass::text FROM pg_class c WHERE c.relkind = 'r'"
            " AND c.relpersistence = 'u' ORDER BY pg_table_size(c.oid)"
        ).fetchall()
        out["restore_unlogged_tables"] = len(unlogged)
        started = time.monotonic()
        for (table,) in unlogged:
            conn.execute(sql.SQL("ALTER TABLE {} SET LOGGED").format(sql.SQL(table)))
        out["set_logged_seconds"] = round(time.monotonic() - started, 3)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))
    return out


def stages(logs: list[dict[str, Any]], total: float) -> dict[str, float]:
    """Seconds per stage, from the job's own log lines."""
    by_message: dict[str, dict[str, Any]] = {}
    for line in logs:
        by_message.setdefault(line.get("message", ""), line)
    finished = by_message.get("run finished", {})
    tables = [x for x in logs if x.get("message") == "table copied"]
    if "stage_seconds" in finished:
        out = dict(finished["stage_seconds"])
        if tables and "index_seconds" in tables[0]:
            # Summed over the tables: more than the stage when connections work in parallel.
            indexes = sum(x["index_seconds"] for x in tables)
            out["inserts_sum"] = round(sum(x["seconds"] for x in tables) - indexes, 3)
            out["indexes_sum"] = round(indexes, 3)
        return {**out, "total": round(total, 3)}
    inserts = sum(x.get("seconds", 0.0) for x in tables)
    copy_total = float(finished.get("copy_seconds", 0.0))
    dumped = by_message.get("pg_dump done", {})
    pg_dump = float(dumped.get("seconds", 0.0))
    publish = _clock(by_message.get("published")) - _clock(dumped)
    return {
        "copy": round(inserts, 3),
        "index": round(copy_total - inserts, 3),
        "pg_dump": round(pg_dump, 3),
        "drop_publish": round(publish, 3),
        "other": round(total - copy_total - pg_dump - publish, 3),
        "total": round(total, 3),
    }


def _clock(line: dict[str, Any] | None) -> float:
    if not line or "time" not in line:
        return 0.0
    return datetime.strptime(line["time"], "%Y-%m-%d %H:%M:%S,%f").timestamp()


# -- the whole benchmark -------------------------------------------------------------------


def source_sizes(url: str, tables: tuple[str, ...]) -> dict[str, Any]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT c.relname, c.reltuples::bigint, pg_table_size(c.oid),"
            " pg_total_relation_size(c.oid) FROM pg_class c"
            " WHERE c.oid = ANY(%s::regclass[]) ORDER BY 1",
            [list(tables)],
        ).fetchall()
    sizes = {r[0]: {"rows": r[1], "table_bytes": r[2], "total_bytes": r[3]} for r in rows}
    return {
        "tables": sizes,
        "table_bytes": sum(t["table_bytes"] for t in sizes.values()),
        "total_bytes": sum(t["total_bytes"] for t in sizes.values()),
    }


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    keys = [k for k, v in runs[0].items() if isinstance(v, int | float) and k != "round"]
    for key in keys:
        out[key] = statistics.median(r[key] for r in runs)
    if "stages" in runs[0]:
        out["stages"] = {
            k: round(statistics.median(r["stages"][k] for r in runs), 3) for k in runs[0]["stages"]
        }
    return out


def bench_scale(
    ctx: Context, scale: float, variants: list[Variant], rounds: int, say: Any
) -> dict[str, Any]:
    sizes = source_sizes(ctx.source, ctx.tables)
    say(f"scale {scale:g}: {sizes['table_bytes'] / 1e6:.0f} MB of tables; warming the cache")
    run_once(ctx, variants[0])
    runs: list[dict[str, Any]] = []
    for number in range(rounds):
        shift = number % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            result = run_once(ctx, variant)
            result["round"] = number + 1
            runs.append(result)
            say(
                f"  round {number + 1} {variant.name:>10}: {result['seconds']:7.2f} s"
                f"  wal {result['wal_bytes'] / 1e6:8.1f} MB  load {result['load1']}"
            )
    summary = {v.name: medians([r for r in runs if r["variant"] == v.name]) for v in variants}
    ratios = {
        f"{v.name}/{a.name}": round(summary[v.name]["seconds"] / summary[a.name]["seconds"], 3)
        for v in variants
        if v.kind == "job"
        for a in variants
        if a.kind == "pg_dump"
    }
    # The ratio within each round, where both ran under the same load; then its median.
    seconds = {(r["variant"], r["round"]): r["seconds"] for r in runs}
    paired = {
        f"{v.name}/{a.name}": round(
            statistics.median(
                seconds[v.name, n] / seconds[a.name, n] for n in range(1, rounds + 1)
            ),
            3,
        )
        for v in variants
        if v.kind == "job"
        for a in variants
        if a.kind == "pg_dump"
    }
    return {
        "scale": scale,
        "source": sizes,
        "runs": runs,
        "medians": summary,
        "ratios": ratios,
        "paired_ratios": paired,
    }


def machine() -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_bytes": memory,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def job_compression(env: dict[str, str]) -> str | None:
    """The compression the job of this worktree writes its dump with, given these settings."""
    from app import config, dump

    if not hasattr(dump, "compression"):
        return None
    settings = {**env, "DATABASE_URL": "dbname=x"}
    if settings.get("SCRATCH_DATABASE_URL") == SAME_SERVER:
        settings["SCRATCH_DATABASE_URL"] = f"dbname={SCRATCH_DATABASE}"
    loaded = config.load(settings)
    pg_dump = dump.PgDump(path="pg_dump", major=MAJOR, version="")
    return str(dump.compression(loaded.dump_compression, pg_dump))


@contextlib.contextmanager
def checkouts(revs: set[str], root: Path) -> Iterator[dict[str, Path]]:
    """`app/` of each git revision unpacked into a folder of its own."""
    out: dict[str, Path] = {}
    try:
        for rev in revs:
            target = Path(tempfile.mkdtemp(prefix=f"rev-{rev[:12]}-", dir=root))
            archive = subprocess.run(
                ["git", "-C", str(REPO), "archive", "--format=tar", rev, "app"],
                check=True,
                capture_output=True,
            ).stdout
            with tempfile.TemporaryFile() as handle:
                handle.write(archive)
                handle.seek(0)
                with tarfile.open(fileobj=handle) as tar:
                    tar.extractall(target, filter="data")
            out[rev] = target
        yield out
    finally:
        for path in out.values():
            shutil.rmtree(path, ignore_errors=True)


def parse_variants(args: argparse.Namespace) -> list[Variant]:
    """A, the job's variants, and A at the compression of each job variant that has one."""
    variants = [Variant("A", "pg_dump")]
    for spec in args.dump or []:
        name, _, flags = spec.partition("=")
        variants.append(Variant(name, "pg_dump", args=flags.split()))
    jobs = args.job or DEFAULT_JOBS
    for spec in jobs:
        head, _, settings = spec.partition(":")
        name, _, rev = head.partition("@")
        env = dict(s.split("=", 1) for s in settings.split(",") if s)
        variants.append(Variant(name, "job", env=env, rev=rev or None))
    for variant in [v for v in variants if v.kind == "job"]:
        compress = job_compression(variant.env) if variant.rev is None else None
        flags = [f"--compress={compress}"] if compress else []
        if compress and not any(v.kind == "pg_dump" and v.args == flags for v in variants):
            variants.append(Variant(f"A_{compress.replace(':', '')}", "pg_dump", args=flags))
    return variants


def render(report: dict[str, Any]) -> str:
    """The Markdown table of medians and ratios."""
    server = report["server"]
    mach = report["machine"]
    lines = [
        "# Benchmark results",
        "",
        f"Generated {report['generated_at']} by `{report['command']}`.",
        f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['memory_bytes'] / 2**30:.0f} GiB "
        f"RAM, Linux {mach['kernel']}. Server: PostgreSQL {server['server_version']} "
        f"(fsync {server.get('fsync')}, shared_buffers {server.get('shared_buffers')}, "
        f"max_wal_size {server.get('max_wal_size')}, data checksums "
        f"{server.get('data_checksums')}); {report['pg_dump']}. "
        f"Medians of {report['rounds']} alternating rounds; warm cache; other work on the "
        f"machine: load average {report['load_min']:.1f} to {report['load_max']:.1f} "
        "during the runs.",
        "",
        "| variant | what |",
        "|---|---|",
        *[f"| {v['name']} | `{v['describe']}` |" for v in report["variants"]],
        "",
        "| scale | tables MB | variant | seconds | ratio (paired) | peak RSS MB | WAL MB (of table "
        "data) | peak extra disk MB | dump MB | stages (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in report["scales"]:
        table_mb = entry["source"]["table_bytes"] / 1e6
        for name, m in entry["medians"].items():
            ratio = " ".join(
                f"{key.split('/')[1]}: {value:.2f} ({entry['paired_ratios'][key]:.2f})"
                for key, value in entry["ratios"].items()
                if key.startswith(name + "/")
            )
            rss = f"{m['rss_bytes'] / 1e6:.0f}"
            if "job_rss_bytes" in m:
                rss = f"{m['job_rss_bytes'] / 1e6:.0f} (pg_dump {m['pg_dump_rss_bytes'] / 1e6:.0f})"
            wal = m["wal_bytes"]
            share = wal / entry["source"]["table_bytes"]
            stage = ", ".join(
                f"{k} {v:.1f}" for k, v in m.get("stages", {}).items() if k != "total"
            )
            if "restore_seconds" in m:
                stage += f"; pg_restore {m['restore_seconds']:.1f}"
                if m["restore_unlogged_tables"]:
                    stage += f" + SET LOGGED {m['set_logged_seconds']:.1f}"
            lines.append(
                f"| {entry['scale']:g} | {table_mb:.0f} | {name} | {m['seconds']:.2f} | {ratio} "
                f"| {rss} | {wal / 1e6:.1f} ({share:.0%}) | "
                f"{m['peak_extra_disk_bytes'] / 1e6:.0f} | {m['dump_bytes'] / 1e6:.0f} | {stage} |"
            )
    lines += [
        "",
        "Ratios are of the medians, and in brackets the median of the ratios within each "
        "round (both ran under the same load). Peak RSS of the job is its Python process "
        "(pg_dump's in brackets). WAL is what the source wrote during the run "
        "(`pg_current_wal_insert_lsn()` before and after), as a share of the listed tables' "
        "size; peak extra disk is the largest growth of the data directory, WAL included, "
        "sampled every 0.2 s. B_scratchdb builds its copy in another database of the same "
        "cluster, so its WAL and disk are the scratch database's writes (the source itself "
        "writes nothing: a separate server would see none of them); B_embedded builds it in "
        "a throwaway server under the storage folder, outside the measured data directory. "
        "Stages, from the job's last log line: setup = lock, leftovers and the embedded "
        "server's start, prepare = scratch schema (or database) and empty tables, copy = "
        "rows (in the default mode with indexes and sequences, connections in parallel), "
        "indexes (scratch-database modes), foreign_keys, other = catalog, plan, scan and "
        "manifest, pg_dump, drop_publish = dropping the copy and the atomic publish; "
        "inserts_sum and indexes_sum add up the seconds each table took on its connection. "
        "pg_restore (with --restore) is the developer's side: a restore into an empty "
        "database of the same server. A job too old to log its stages gets them from its "
        "other log lines: copy = the INSERTs, index = indexes, foreign keys and commit, "
        "other = the rest.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--scale", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(os.environ.get("BENCH_WORKDIR", "/var/tmp/sanitised-dump-bench")),  # noqa: S108
        help="where the cluster and its databases are kept between runs",
    )
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "results")
    parser.add_argument(
        "--job",
        action="append",
        metavar="NAME[@REV][:VAR=VALUE,...]",
        help="a job variant (default: B, B_scratchdb and B_embedded, the three modes); repeatable",
    )
    parser.add_argument(
        "--dump", action="append", metavar="NAME=FLAGS", help="an extra pg_dump variant"
    )
    parser.add_argument(
        "--only", action="append", metavar="TABLE", help="list only this table (repeatable)"
    )
    parser.add_argument(
        "--restore",
        action="store_true",
        help="also time pg_restore of each job dump into an empty database of the same server",
    )
    args = parser.parse_args(argv)

    def say(text: str) -> None:
        print(text, flush=True)

    variants = parse_variants(args)
    storage = args.workdir / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    revs = {v.rev for v in variants if v.rev}
    report: dict[str, Any] = {
        "generated_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python -m bench.run", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(),
        "rounds": args.rounds,
        "variants": [{"name": v.name, "describe": v.describe()} for v in variants],
        "scales": [],
    }
    with Server(args.workdir) as server, checkouts(revs, args.workdir) as revdirs:
        report["server"] = server.settings()
        version = subprocess.run(
            [str(server.bindir / "pg_dump"), "--version"], capture_output=True, text=True
        )
        report["pg_dump"] = version.stdout.strip()
        allow = generate.write_allow_list(args.workdir / "allow_list.json", args.only)
        tables = tuple(t for t in generate.TABLES if not args.only or t.split(".")[1] in args.only)
        for scale in args.scale:
            source = server.database(scale, say)
            ctx = Context(server, source, allow, storage, revdirs, args.restore, tables)
            report["scales"].append(bench_scale(ctx, scale, variants, args.rounds, say))
            loads = [r["load1"] for s in report["scales"] for r in s["runs"]]
            report["load_min"], report["load_max"] = min(loads), max(loads)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
            args.out.with_suffix(".md").write_text(render(report))
    say(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    # A kill stops the benchmark's server too, through the `with` in main().
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(main())
