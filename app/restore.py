"""`restore`: a sanitised dump into a developer's database, under the original names.

pg_restore loads the dump as it is (the copied tables in the scratch schema); then one
transaction moves every table, sequence and type back to the schema and name that the
manifest says it came from, names indexes and sequences back, and drops the emptied
scratch schema. The manifest stays in the target as `sanitised_dump.manifest`, so the
database can always tell which dump it holds.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import errors as pgerrors
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from app import archive, dump
from app import manifest as mf
from app.config import Config
from app.errors import ConfigError, DatabaseError, PgRestoreError
from app.log import log

# Below this size one pg_restore connection is faster than starting workers.
PARALLEL_FROM_BYTES = 64 * 1024 * 1024
MAX_JOBS = 4

# What makes a target "not empty": relations and types of the application (not of an
# extension) in any schema but the system ones, and the schemas the dump creates.
NOT_EMPTY = """
SELECT what FROM (
  SELECT kind || ' ' || quote_ident(nspname) || '.' || quote_ident(name) AS what,
         kind = 'table' AS first, nspname, name
  FROM (
    SELECT CASE c.relkind WHEN 'S' THEN 'sequence' WHEN 'v' THEN 'view'
                          WHEN 'm' THEN 'materialized view' WHEN 'f' THEN 'foreign table'
                          ELSE 'table' END AS kind, n.nspname, c.relname AS name
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
      AND NOT EXISTS (SELECT 1 FROM pg_depend e WHERE e.classid = 'pg_class'::regclass
                       AND e.objid = c.oid AND e.deptype = 'e')
  UNION ALL
    SELECT 'type', n.nspname, t.typname
    FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
    WHERE (t.typtype IN ('e', 'd', 'r')
           OR (t.typtype = 'c' AND (SELECT relkind FROM pg_class WHERE oid = t.typrelid) = 'c'))
      AND NOT EXISTS (SELECT 1 FROM pg_depend e WHERE e.classid = 'pg_type'::regclass
                       AND e.objid = t.oid AND e.deptype = 'e')
  ) AS objects
  WHERE nspname NOT IN ('pg_catalog', 'information_schema') AND nspname NOT LIKE 'pg\\_%%'
UNION ALL
  SELECT 'schema ' || quote_ident(nspname), true, nspname, ''
  FROM pg_namespace WHERE nspname = ANY(%(created)s)
) AS found
ORDER BY first DESC, nspname, name
"""

NAMES_IN_SCHEMA = """
SELECT relname FROM pg_class WHERE relnamespace = %(schema)s::regnamespace
UNION SELECT typname FROM pg_type WHERE typnamespace = %(schema)s::regnamespace
"""

_KINDS = {"enum": "TYPE", "domain": "DOMAIN"}


@dataclass(frozen=True)
class Options:
    dump: Path
    target: str
    clean: bool
    jobs: int | None


@dataclass(frozen=True)
class Rename:
    kind: str  # TABLE, INDEX, SEQUENCE, TYPE, DOMAIN
    schema: str
    old: str
    new: str


def describe(target: str) -> str:
    """The target for a log line: user, host, port and database, never the password."""
    params = conninfo_to_dict(target)
    host = params.get("host") or os.environ.get("PGHOST") or "local socket"
    port = params.get("port") or os.environ.get("PGPORT") or "5432"
    user = f"{params['user']}@" if params.get("user") else ""
    return f"{user}{host}:{port}/{params.get('dbname') or os.environ.get('PGDATABASE', '')}"


def run(config: Config, options: Options) -> int:
    started = time.monotonic()
    try:
        where = describe(options.target)
    except psycopg.ProgrammingError as exc:
        raise ConfigError(f"--target is not a valid connection string or URL: {exc}") from None
    header = archive.read_header(options.dump)
    pg_restore = archive.find(config.pg_restore, header)
    manifest, location = mf.read(pg_restore, options.dump)
    tables = manifest["tables"]
    log.info(
        "restore started",
        extra={
            "dump": str(options.dump),
            "target": where,
            "made_at": manifest["made_at"],
            "source_server_version": manifest["source"]["server_version"],
            "tables": len(tables),
            "pg_restore": pg_restore.version,
            "clean": options.clean,
        },
    )
    created = _schemas_the_dump_creates(manifest, location)
    with _connect(config, options.target, where) as conn:
        _refuse_the_source(conn, manifest, where)
        _warn_older_server(conn, manifest)
        if options.clean:
            _clean(conn, manifest, created)
        else:
            _refuse_not_empty(conn, where, created)
        before = _schemas(conn)

    jobs = options.jobs or _default_jobs(options.dump)
    try:
        seconds = _pg_restore(config, pg_restore, options.dump, options.target, jobs)
        log.info("pg_restore done", extra={"seconds": round(seconds, 3), "jobs": jobs})
        with _connect(config, options.target, where) as conn, conn.transaction():
            moved = _move_back(conn, manifest, location)
    except BaseException:
        _drop_new_schemas(config, options.target, where, created - before)
        raise
    with _connect(config, options.target, where) as conn:
        for table in tables:
            conn.execute(
                sql.SQL("ANALYZE {}").format(sql.Identifier(table["schema"], table["name"]))
            )
    log.info(
        "restore finished",
        extra={
            "target": where,
            "tables": len(tables),
            "rows": sum(t["rows"] for t in tables),
            "moved": moved,
            "manifest": f"{mf.HOME.schema}.{mf.HOME.table}",
            "seconds": round(time.monotonic() - started, 3),
            "exit_code": 0,
        },
    )
    return 0


def _connect(config: Config, target: str, where: str) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(
            target, autocommit=True, application_name=config.application_name, connect_timeout=10
        )
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        raise DatabaseError(f"cannot connect to the target {where}: {first}") from None


def _schemas_the_dump_creates(manifest: dict[str, Any], location: mf.Location) -> set[str]:
    """Schemas of the archive that must not exist before pg_restore creates them."""
    scratch = {o["scratch_schema"] for o in _objects(manifest)} | {location.schema}
    kept = {o["schema"] for o in _objects(manifest)}
    return scratch - kept


def _objects(manifest: dict[str, Any]) -> Iterable[dict[str, Any]]:
    return itertools.chain(manifest["types"], manifest["sequences"], manifest["tables"])


def _schemas(conn: psycopg.Connection[Any]) -> set[str]:
    return {r[0] for r in conn.execute("SELECT nspname FROM pg_namespace")}


def _refuse_the_source(conn: psycopg.Connection[Any], manifest: dict[str, Any], where: str) -> None:
    """The source is never a target, even an empty one: compare the server's system
    identifier and the database name with those recorded in the manifest."""
    target = mf.source_identity(conn)
    source = manifest["source"]
    if not (source.get("system_identifier") and target.system_identifier):
        log.warning(
            "cannot tell whether the target is the dump's source: pg_control_system() is not "
            "granted on one of them",
            extra={"target": where},
        )
        return
    if (source["system_identifier"], source["database"]) == (
        target.system_identifier,
        target.database,
    ):
        raise ConfigError(
            f"refusing to restore into {where}: it is the database the dump was made from "
            f"(database {target.database!r} on the server with system identifier "
            f"{target.system_identifier}); restore into a developer's database instead"
        )


def _warn_older_server(conn: psycopg.Connection[Any], manifest: dict[str, Any]) -> None:
    source = int(manifest["source"]["server_version_num"]) // 10000
    target = conn.info.server_version // 10000
    if target < source:
        log.warning(
            "the target server is older than the source: the restore may fail on SQL the "
            "older server does not know",
            extra={"target_major": target, "source_major": source},
        )


def _refuse_not_empty(conn: psycopg.Connection[Any], where: str, created: set[str]) -> None:
    found = [r[0] for r in conn.execute(NOT_EMPTY, {"created": sorted(created)})]
    if found:
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise ConfigError(
            f"refusing to restore into {where}: the database is not empty ({shown}); restore "
            "into an empty database, or pass --clean to drop what the dump replaces"
        )


def _clean(conn: psycopg.Connection[Any], manifest: dict[str, Any], created: set[str]) -> None:
    """Drop, with what depends on them, the objects the restore is about to create under
    their final names, and the schemas the dump brings; leave everything else alone."""
    statements: list[sql.Composed] = [
        sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(s))
        for s in sorted(created | {mf.HOME.schema})
    ]
    statements += [
        sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(sql.Identifier(t["schema"], t["name"]))
        for t in manifest["tables"]
    ]
    statements += [
        sql.SQL("DROP SEQUENCE IF EXISTS {} CASCADE").format(sql.Identifier(s["schema"], s["name"]))
        for s in itertools.chain(
            manifest["sequences"], *(t["sequences"] for t in manifest["tables"])
        )
    ]
    statements += [
        sql.SQL("DROP {} IF EXISTS {} CASCADE").format(
            sql.SQL(_KINDS[t["kind"]]), sql.Identifier(t["schema"], t["name"])
        )
        for t in manifest["types"]
    ]
    with conn.transaction():
        for statement in statements:
            conn.execute(statement)
    log.info("cleaned the target", extra={"dropped_if_present": len(statements)})


def _default_jobs(path: Path) -> int:
    files = path.iterdir() if path.is_dir() else [path]
    size = sum(f.stat().st_size for f in files)
    return min(MAX_JOBS, os.cpu_count() or 1) if size >= PARALLEL_FROM_BYTES else 1


def _pg_restore(
    config: Config, pg_restore: archive.PgRestore, path: Path, target: str, jobs: int
) -> float:
    dbname, env = dump.child_env(target, config.application_name)
    args = [pg_restore.path, "--exit-on-error", "--no-owner", "--no-acl", f"--dbname={dbname}"]
    args += [f"--jobs={jobs}"] if jobs > 1 else ["--single-transaction"]
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [*args, str(path)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            check=False,
            preexec_fn=dump._die_with_parent,
        )
    except OSError as exc:
        raise PgRestoreError(f"cannot run {pg_restore.path}: {exc}") from None
    if proc.returncode != 0:
        message = proc.stderr.decode(errors="replace").strip()[-2000:]
        raise PgRestoreError(f"pg_restore failed (exit {proc.returncode}): {message}")
    return time.monotonic() - started


def _move_back(
    conn: psycopg.Connection[Any], manifest: dict[str, Any], location: mf.Location
) -> int:
    """Inside the caller's transaction: every object to its original schema and name."""
    moves: list[sql.Composed] = []
    renames: list[Rename] = []
    for kind, objects in (
        ("TYPE", manifest["types"]),
        ("SEQUENCE", manifest["sequences"]),
        ("TABLE", manifest["tables"]),
    ):
        for o in objects:
            keyword = _KINDS[o["kind"]] if kind == "TYPE" else kind
            if o["scratch_schema"] != o["schema"]:
                moves.append(
                    sql.SQL("ALTER {} {} SET SCHEMA {}").format(
                        sql.SQL(keyword),
                        sql.Identifier(o["scratch_schema"], o["scratch_name"]),
                        sql.Identifier(o["schema"]),
                    )
                )
            renames.append(Rename(keyword, o["schema"], o["scratch_name"], o["name"]))
    for table in manifest["tables"]:
        # Owned sequences and indexes went along with their table, into its schema.
        renames += [
            Rename("SEQUENCE", table["schema"], s["scratch_name"], s["name"])
            for s in table["sequences"]
        ]
        renames += [
            Rename("INDEX", table["schema"], i["scratch_name"], i["name"]) for i in table["indexes"]
        ]
    if location != mf.HOME:
        moves.append(
            sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(
                sql.Identifier(location.schema, location.table), sql.Identifier(mf.HOME.schema)
            )
        )
        renames.append(Rename("TABLE", mf.HOME.schema, location.table, mf.HOME.table))

    destinations = {o["schema"] for o in _objects(manifest)} | {mf.HOME.schema}
    for schema in sorted(destinations):
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
    for statement in moves:
        conn.execute(statement)
    _rename_all(conn, [r for r in renames if r.old != r.new])
    emptied = ({o["scratch_schema"] for o in _objects(manifest)} | {location.schema}) - destinations
    for schema in sorted(emptied):
        try:
            conn.execute(sql.SQL("DROP SCHEMA {}").format(sql.Identifier(schema)))
        except pgerrors.DependentObjectsStillExist as exc:
            raise DatabaseError(
                f"schema {schema!r} still holds objects the manifest does not list after the "
                f"move: {exc.diag.message_detail}"
            ) from None
    return len(moves)


def _rename_all(conn: psycopg.Connection[Any], renames: list[Rename]) -> None:
    """Through names nobody holds first: a scratch name may be another object's original."""
    taken: dict[str, set[str]] = {}
    staged = []
    for rename in renames:
        names = taken.get(rename.schema)
        if names is None:
            rows = conn.execute(
                NAMES_IN_SCHEMA, {"schema": sql.Identifier(rename.schema).as_string(conn)}
            )
            names = taken[rename.schema] = {r[0] for r in rows}
        temp = next(n for n in (f"sanitised_dump_{i}" for i in itertools.count()) if n not in names)
        names.add(temp)
        conn.execute(_rename(rename, rename.old, temp))
        staged.append((rename, temp))
    for rename, temp in staged:
        conn.execute(_rename(rename, temp, rename.new))


def _rename(rename: Rename, old: str, new: str) -> sql.Composed:
    return sql.SQL("ALTER {} {} RENAME TO {}").format(
        sql.SQL(rename.kind), sql.Identifier(rename.schema, old), sql.Identifier(new)
    )


def _drop_new_schemas(config: Config, target: str, where: str, schemas: set[str]) -> None:
    """After a failed restore, drop the schemas it created, so that the next try finds the
    target as it was; never raise over the original error."""
    try:
        with _connect(config, target, where) as conn:
            for schema in sorted(schemas):
                conn.execute(
                    sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
                )
    except (psycopg.Error, DatabaseError) as exc:
        log.error(
            "could not drop the half-restored schemas; restore again with --clean",
            extra={"schemas": sorted(schemas), "error": str(exc)},
        )
