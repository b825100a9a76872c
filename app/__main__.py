"""`python -m app [dump|check|plan|scan|inspect|restore]`: wires the stages and turns errors
into exit codes."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from app import (
    __version__,
    allowlist,
    archive,
    catalog,
    db,
    dump,
    monitoring,
    publish,
    report,
    scan,
    toc,
)
from app import config as configuration
from app import log as logging_setup
from app import manifest as mf
from app import restore as restoring
from app.config import Config
from app.errors import AllowListMismatch, ConfigError, DatabaseError, Interrupted, JobError
from app.log import log
from app.plan import KEPT, Plan, TablePlan, build, validate
from app.scratch import Located, Scratch, open_scratch
from app.scrub import TableResult

COMMANDS = ("dump", "check", "plan", "scan", "inspect", "restore")
# Copies a hot standby may cancel (conflict with recovery) before the run gives up.
RECOVERY_ATTEMPTS = 3


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = configuration.load()
    except JobError as exc:
        logging_setup.setup()
        log.error(str(exc), extra={"exit_code": exc.exit_code})
        return exc.exit_code
    logging_setup.setup(config.log_format, config.log_level, _secrets(config, args))
    command: Callable[[Config, argparse.Namespace], int] = {
        "dump": run_dump,
        "check": run_check,
        "plan": run_plan,
        "scan": run_scan,
        "inspect": run_inspect,
        "restore": run_restore,
    }[args.command or "dump"]
    _install_signal_handlers()
    if command is not run_dump:
        return _run(command, config, args)
    with monitoring.checkin(os.environ) as run:
        run.exit_code = _run(command, config, args)
    return run.exit_code


def _run(
    command: Callable[[Config, argparse.Namespace], int], config: Config, args: argparse.Namespace
) -> int:
    """Run one command; every error the job expects becomes one log line and an exit code."""
    try:
        return command(config, args)
    except JobError as exc:
        log.error(str(exc), extra={"exit_code": exc.exit_code})
        return exc.exit_code
    except Interrupted as exc:
        log.error(
            "interrupted: scratch schema dropped, nothing published"
            if args.command in (None, "dump")
            else "interrupted",
            extra={"exit_code": exc.exit_code, "signal": exc.signum},
        )
        return exc.exit_code
    except psycopg.errors.LockNotAvailable:
        log.error(
            f"waited longer than LOCK_TIMEOUT={config.lock_timeout} for a table lock (a "
            "migration may be running): run again later or raise LOCK_TIMEOUT",
            extra={"exit_code": DatabaseError.exit_code},
        )
        return DatabaseError.exit_code
    except psycopg.errors.QueryCanceled as exc:
        log.error(
            f"a statement was cancelled ({exc.diag.message_primary}): the server's "
            "statement_timeout is too short for the copy, or an operator cancelled it",
            extra={"exit_code": DatabaseError.exit_code},
        )
        return DatabaseError.exit_code
    except psycopg.Error as exc:
        log.error(f"database error: {exc}", extra={"exit_code": DatabaseError.exit_code})
        return DatabaseError.exit_code
    except Exception:
        log.exception("unexpected error", extra={"exit_code": 1})
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m app",
        description="Publish a PostgreSQL dump in which every column that the allow list does "
        "not keep holds a deterministic fake. Configured by environment variables (README).",
    )
    parser.add_argument("--version", action="version", version=f"sanitised-dump {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser(
        "dump",
        help="copy, fake, dump and publish (the default)",
        description="Copy the listed tables into the scratch schema with fakes, "
        "pg_dump it, drop it, and publish the dump atomically.",
    )
    for name, text in (
        ("check", "compare the allow list with the live schema; writes nothing"),
        ("plan", "show, per table and column, what is kept and each fake; writes nothing"),
    ):
        command = sub.add_parser(name, help=text, description=text)
        command.add_argument("--format", choices=("text", "json"), default="text")
    command = sub.add_parser(
        "scan",
        help="look for personal data and secrets in kept columns; writes nothing",
        description="Sample the allow list's kept columns on the source (read-only), or every "
        "column of a dump (--dump, no database needed), for values that look like email "
        "addresses, phone numbers, IP addresses, JWTs, random tokens, password hashes, NHS "
        "numbers or payment cards, and list free-text columns for review. Exit 0 when clean, "
        "3 when something is found.",
    )
    command.add_argument("--format", choices=("text", "json"), default="text")
    command.add_argument("--dump", metavar="PATH", type=Path, help="scan this dump file instead")
    command.add_argument(
        "--rows", type=_positive, metavar="N", help="rows read per table (default SCAN_ROWS)"
    )
    text = "print the manifest inside a dump (no database needed)"
    inspect = sub.add_parser(
        "inspect",
        help=text,
        description=f"{text}: when it was made, from which server, with which allow list, "
        "and per table its rows, kept columns and the fake of every other column.",
    )
    inspect.add_argument("dump", nargs="?", type=Path, help="default: $STORAGE_DIR/$DUMP_NAME")
    inspect.add_argument("--format", choices=("text", "json"), default="text")
    text = "restore a dump into a developer's database under the original names"
    restore = sub.add_parser(
        "restore",
        help=text,
        description=f"{text}: pg_restore, then every table, sequence and type moves from "
        "the scratch schema back to its original schema and name. Refuses a target that is "
        "not empty (unless --clean) and the database the dump was made from.",
    )
    restore.add_argument("--dump", type=Path, help="default: $STORAGE_DIR/$DUMP_NAME")
    restore.add_argument(
        "--target",
        metavar="URL",
        help="libpq URI or conninfo of the database to restore into (default: "
        "$TARGET_DATABASE_URL); keep the password in PGPASSWORD or ~/.pgpass",
    )
    restore.add_argument(
        "--clean",
        action="store_true",
        help="drop the tables, sequences and types the dump brings (under their original "
        "names, with what depends on them) before restoring",
    )
    restore.add_argument(
        "--jobs",
        type=_positive,
        metavar="N",
        help=f"parallel pg_restore jobs (default: 1 below "
        f"{restoring.PARALLEL_FROM_BYTES // 2**20} MiB, else up to {restoring.MAX_JOBS})",
    )
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _secrets(config: Config, args: argparse.Namespace) -> list[str]:
    secrets = [os.environ.get("PGPASSWORD", ""), config.pseudonym_key or ""]
    urls = [config.database_url, getattr(args, "target", None), _target_from_env()]
    if config.mode == "database":
        urls.append(config.scratch_database_url)
    for url in filter(None, urls):
        with contextlib.suppress(psycopg.ProgrammingError):
            secrets.append(str(conninfo_to_dict(url).get("password") or ""))
    return [s for s in secrets if s]


def _target_from_env() -> str | None:
    return os.environ.get("TARGET_DATABASE_URL", "").strip() or None


def _read_plan(
    config: Config, conn: psycopg.Connection[Any], allow: allowlist.AllowList | None = None
) -> Plan:
    allow = allow or allowlist.load(config.allow_list)
    plan = build(catalog.read(conn, allow, config.scratch_schema), config.scratch_schema)
    validate(conn, plan)
    return plan


def run_check(config: Config, args: argparse.Namespace) -> int:
    allow = allowlist.load(config.allow_list)
    allowlist.check_schema(allow)
    with db.connect(config, autocommit=True) as conn:
        conn.read_only = True
        with conn.transaction():
            plan = _read_plan(config, conn, allow)
            result = report.check_report(plan)
    print(report.render(result, args.format, "check"))
    return 0


def run_plan(config: Config, args: argparse.Namespace) -> int:
    with db.connect(config, autocommit=True) as conn, conn.transaction():
        plan = _read_plan(config, conn)
        result = report.plan_report(plan, conn)
    print(report.render(result, args.format, "plan"))
    return 0


def run_scan(config: Config, args: argparse.Namespace) -> int:
    rows = args.rows if args.rows is not None else config.scan_rows
    if args.dump is not None:
        pg_restore = archive.find(config.pg_restore, archive.read_header(args.dump))
        result = scan.scan_dump(pg_restore, args.dump, rows)
    else:
        with db.connect(config, autocommit=True) as conn:
            conn.read_only = True
            with conn.transaction():
                plan = _read_plan(config, conn)
                targets = [
                    scan.Target(
                        tp.table.qualified,
                        tp.table.schema,
                        tp.table.name,
                        _kept(tp),
                        only=tp.table.relkind == "r",
                    )
                    for tp in plan.tables
                    if not tp.structure_only
                ]
                result = scan.scan_tables(conn, plan.catalog, targets, rows, "the source")
    print(result.render(args.format))
    return 0 if result.clean else AllowListMismatch.exit_code


def _kept(tp: TablePlan) -> list[catalog.Column]:
    return [c.column for c in tp.columns if c.action == KEPT]


def run_inspect(config: Config, args: argparse.Namespace) -> int:
    path: Path = args.dump or config.dump_path
    header = archive.read_header(path)
    pg_restore = archive.find(config.pg_restore, header)
    manifest, _ = mf.read(pg_restore, path)
    result = mf.report(path, header, manifest)
    print(json.dumps(result, indent=2) if args.format == "json" else mf.text(result))
    return 0


def run_restore(config: Config, args: argparse.Namespace) -> int:
    target = args.target or _target_from_env()
    if not target:
        raise ConfigError("restore needs --target URL (or TARGET_DATABASE_URL)")
    _install_signal_handlers()
    options = restoring.Options(args.dump or config.dump_path, target, args.clean, args.jobs)
    return restoring.run(config, options)


def run_dump(config: Config, args: argparse.Namespace) -> int:
    started = time.monotonic()
    logging_setup.stamp(mode=config.mode)
    allow = allowlist.load(config.allow_list)
    publish.check_storage(config.storage_dir)
    _install_signal_handlers()
    lock_conn = db.connect(config, autocommit=True)
    try:
        with db.connect(config) as work:
            return _dump(config, allow, lock_conn, work, started)
    finally:
        lock_conn.close()


def _dump(
    config: Config,
    allow: allowlist.AllowList,
    lock_conn: psycopg.Connection[Any],
    work: psycopg.Connection[Any],
    started: float,
) -> int:
    scratch = open_scratch(config, lock_conn, work)
    source = _Source(config, work)
    temp: Path | None = None
    try:
        pg_dump = dump.find(config.pg_dump, scratch.server_major())
        compression = dump.compression(config.dump_compression, pg_dump)
        # Only an archive whose layout is known can be made to restore like the source.
        scratch.restore_like_source = toc.supported(pg_dump.major)
        log.info(
            "run started",
            extra={
                "version": __version__,
                "server_version": work.info.parameter_status("server_version"),
                "pg_dump": pg_dump.version,
                "compression": compression,
                "settings": config.describe(),
                "tables": len(allow.entries),
                "mode": scratch.mode,
            },
        )
        db.take_lock(lock_conn, config.scratch_schema)
        setup_started = time.monotonic()
        scratch.prepare()
        setup_seconds = time.monotonic() - setup_started
        for stale in publish.remove_stale(config.storage_dir, config.dump_name):
            log.warning("removed a stale temporary file", extra={"path": str(stale)})

        copy_started = time.monotonic()
        plan, results = _copy(config, allow, scratch, source, lock_conn)
        copy_seconds = time.monotonic() - copy_started
        temp = publish.create_temp(config.storage_dir, config.dump_name)
        target = scratch.dump_source()
        dump_seconds = dump.run(
            pg_dump,
            target.url,
            config.application_name,
            target.schema,
            [name for name, _ in plan.catalog.extensions],
            temp,
            compression=compression,
        )
        log.info(
            "pg_dump done",
            extra={
                "bytes": temp.stat().st_size,
                "compression": compression,
                "seconds": round(dump_seconds, 3),
            },
        )
        scratch.rewrite_dump(temp)
    except BaseException:
        if temp is not None:
            temp.unlink(missing_ok=True)
        raise
    finally:
        dump_finished = time.monotonic()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        scratch.close()
        source.close()

    try:
        published = publish.publish(temp, config.dump_path)
    except BaseException:
        temp.unlink(missing_ok=True)  # a failed or interrupted publish leaves no temp file
        raise
    log.info(
        "published",
        extra={"path": str(published.path), "size": published.size, "sha256": published.sha256},
    )
    log.info(
        "run finished",
        extra={
            "tables": len(results),
            "rows": sum(r.rows for r in results),
            "faked_columns": sum(len(r.faked) for r in results),
            "copy_seconds": round(copy_seconds, 3),
            "stage_seconds": {
                "setup": round(setup_seconds, 3),
                **_copy_stages(scratch, copy_seconds),
                "pg_dump": round(dump_seconds, 3),
                "drop_publish": round(time.monotonic() - dump_finished, 3),
            },
            "seconds": round(time.monotonic() - started, 3),
            "mode": scratch.mode,
            "exit_code": 0,
        },
    )
    return 0


def _copy_stages(scratch: Scratch, seconds: float) -> dict[str, float]:
    """The copy's steps as the scratch timed them; `other` is the plan, scan, manifest."""
    stages = dict(scratch.stages)
    return {**stages, "other": round(seconds - sum(stages.values()), 3)}


class _Source:
    """The source connection of the copy; replaced when a hot standby ended the session."""

    def __init__(self, config: Config, conn: psycopg.Connection[Any]) -> None:
        self.config = config
        self.conn = conn
        self.original = conn

    def renew(self) -> None:
        """A standby may have ended the session without the client noticing yet."""
        if self.conn is not self.original:
            self.conn.close()
        self.conn = db.connect(self.config)

    def close(self) -> None:
        if self.conn is not self.original:
            self.conn.close()


def _scan_copy(
    config: Config, work: psycopg.Connection[Any], located: Located, *, plan: Plan
) -> None:
    """SCAN: sample the copy's kept columns before anything is committed or dumped;
    `work` holds the copy, `located` says where each table sits there."""
    if config.scan == "off":
        return
    targets = [
        scan.Target(tp.table.qualified, *located(tp), _kept(tp))
        for tp in plan.tables
        if not tp.structure_only
    ]
    result = scan.scan_tables(work, plan.catalog, targets, config.scan_rows, "the copy")
    for finding in result.findings:
        log.warning(
            "kept column holds values that look personal",
            extra={**finding, "looks_like": scan.KINDS[finding["kind"]]},
        )
    for column in result.free_text:
        log.info("kept column holds free text: review it", extra=column)
    log.info(
        "scan done",
        extra={
            "values": sum(c.sampled for c in result.columns),
            "columns": len(result.columns),
            "findings": len(result.findings),
            "clean": result.clean,
        },
    )
    if not result.clean and config.scan == "fail":
        columns = sorted({f"{f['table']}.{f['column']}" for f in result.findings})
        raise AllowListMismatch(
            f"SCAN=fail: kept columns hold values that look personal ({', '.join(columns)}); "
            "nothing published. Fake, set or pseudonymise them, or make their table "
            "structure-only (`python -m app scan` lists what was found)"
        )


def _copy(
    config: Config,
    allow: allowlist.AllowList,
    scratch: Scratch,
    source: _Source,
    lock_conn: psycopg.Connection[Any],
) -> tuple[Plan, list[TableResult]]:
    """Read the plan and make the copy from one snapshot. A hot standby may cancel it to
    replay the primary's changes: then start again, whole, from a fresh snapshot."""
    attempt = 1
    while True:
        conflicts = db.recovery_conflicts(lock_conn)
        try:
            if attempt > 1:
                source.renew()
            work = source.conn
            work.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            work.read_only = not scratch.writes_source
            plan = _checked_plan(config, allow, scratch, work)
            inspect = functools.partial(_scan_copy, config, plan=plan)
            return plan, scratch.build(work, plan, allow.sha256, inspect)
        except (psycopg.Error, DatabaseError) as exc:
            lost = isinstance(exc, DatabaseError) or (
                isinstance(exc, psycopg.OperationalError) and source.conn.broken
            )
            if not (
                db.is_recovery_conflict(exc)
                or (lost and conflicts is not None and db.conflict_counted(lock_conn, conflicts))
            ):
                raise
            with contextlib.suppress(psycopg.Error):
                source.conn.rollback()
            scratch.reset()
            if attempt >= RECOVERY_ATTEMPTS:
                raise db.conflict_error("the copy", attempt) from None
            log.warning(
                "the standby cancelled the copy (conflict with recovery): copying again "
                "from a fresh snapshot",
                extra={"attempt": attempt, "of": RECOVERY_ATTEMPTS, "error": str(exc)},
            )
            attempt += 1


def _checked_plan(
    config: Config, allow: allowlist.AllowList, scratch: Scratch, work: psycopg.Connection[Any]
) -> Plan:
    plan = build(catalog.read(work, allow, config.scratch_schema), config.scratch_schema)
    if plan.needs_pseudonym_key and not scratch.writes_source:
        raise ConfigError(
            "the allow list pseudonymises columns, which needs the scratch schema mode for now "
            "(the key reaches the source through a temporary table, which a read-only source "
            "cannot hold): unset SCRATCH_DATABASE_URL, or fake those columns instead"
        )
    if plan.needs_pseudonym_key and config.pseudonym_key is None:
        raise ConfigError(
            "the allow list pseudonymises columns ("
            + ", ".join(f"{tp.table.qualified}.{c}" for tp in plan.tables for c in tp.pseudonymised)
            + "): set PSEUDONYM_KEY to a long random secret, the same for every run"
        )
    validate(work, plan)
    db.check_privileges(
        work, [(t.schema, t.name) for t in plan.catalog.tables], create=scratch.writes_source
    )
    needed = sum(t.size for t in plan.catalog.tables)
    if config.max_scratch_bytes is not None and needed > config.max_scratch_bytes:
        raise AllowListMismatch(
            f"the listed tables take {needed} bytes, more than MAX_SCRATCH_BYTES="
            f"{config.max_scratch_bytes}: raise the limit or list fewer tables"
        )
    for fk in plan.left_out:
        log.info(
            "foreign key left out",
            extra={"foreign_key": fk.describe(plan.catalog), "reason": fk.reason},
        )
    return plan


def _install_signal_handlers() -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise Interrupted(signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


if __name__ == "__main__":
    sys.exit(main())
