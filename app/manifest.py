"""The manifest: what a dump holds, carried inside the dump as a one-row table.

It says when and from which server the dump was made, by which version of the job and
with which allow list, and for every copied table where it came from, where it sits in
the dump, its rows, kept and faked columns (with each fake), the allow list's choices (set
values, pseudonymised columns, structure-only tables, the reviewer's notes), and the names of the
sequences, indexes and types the copy made for it, so that `restore` can name them back.
Its table lives in the scratch schema under a name no copied table can take, or, when the
dump's tables keep their original schemas and names, in a schema of its own (HOME).
"""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from app import __version__, archive
from app.errors import ConfigError
from app.plan import FAKED, MANIFEST_TABLE, Plan, TablePlan, type_chain
from app.scrub import TableResult

FORMAT = 1
MODE_SCRATCH_SCHEMA = "scratch_schema"
COMMENT = "What this sanitised dump holds: `python -m app inspect` prints it"

OWNED_SEQUENCES = """
SELECT r.ord, a.attname AS column, n.nspname AS schema, s.relname AS name
FROM unnest(%s::text[]) WITH ORDINALITY AS r(rel, ord)
JOIN pg_depend d ON d.refobjid = r.rel::regclass AND d.refclassid = 'pg_class'::regclass
     AND d.classid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
JOIN pg_namespace n ON n.oid = s.relnamespace
JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
ORDER BY r.ord, a.attnum
"""


@dataclass(frozen=True)
class Location:
    schema: str
    table: str


# A schema of the manifest's own: where a dump whose tables keep their original schemas
# carries it, and where `restore` leaves it in the target.
HOME = Location("sanitised_dump", "manifest")


def in_scratch(schema: str) -> Location:
    return Location(schema, MANIFEST_TABLE)


@dataclass(frozen=True)
class Source:
    """Which server and database a dump came from: restore refuses to write there."""

    server_version: str
    server_version_num: int
    system_identifier: str | None  # None when pg_control_system() is not granted
    database: str


def source_identity(conn: psycopg.Connection[Any]) -> Source:
    row = conn.execute(
        "SELECT current_setting('server_version'), current_setting('server_version_num')::int,"
        " current_database(), has_function_privilege('pg_catalog.pg_control_system()', 'EXECUTE')"
    ).fetchone()
    assert row is not None
    identifier = None
    if row[3]:
        system = conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()
        identifier = str(system[0]) if system else None
    return Source(row[0], row[1], identifier, row[2])


def owned_sequences(
    conn: psycopg.Connection[Any], tables: list[tuple[str, str]]
) -> list[dict[str, tuple[str, str]]]:
    """For each table, column -> (schema, name) of the serial or identity sequence it owns."""
    found: list[dict[str, tuple[str, str]]] = [{} for _ in tables]
    names = [sql.Identifier(schema, table).as_string(conn) for schema, table in tables]
    for ord_, column, schema, name in conn.execute(OWNED_SEQUENCES, [names]):
        found[ord_ - 1][column] = (schema, name)
    return found


def collect(
    plan: Plan,
    results: list[TableResult],
    location: Location,
    *,
    source: psycopg.Connection[Any],
    scratch: psycopg.Connection[Any] | None = None,
    scratch_schema: str | None,
    allow_list_sha256: str,
    mode: str = MODE_SCRATCH_SCHEMA,
) -> dict[str, Any]:
    """The manifest of a finished copy, before it is committed.

    `scratch` is the connection that holds the copy (the source itself by default);
    `scratch_schema` None means every object sits under its original schema and name."""
    scratch = scratch or source
    catalog = plan.catalog
    by_name = {r.scratch_name: r for r in results}

    def where(schema: str) -> str:
        return scratch_schema or schema

    def located(tp: TablePlan) -> tuple[str, str]:
        if scratch_schema is None:
            return tp.table.schema, tp.table.name
        return scratch_schema, tp.scratch_name

    originals = owned_sequences(source, [(t.table.schema, t.table.name) for t in plan.tables])
    copies = owned_sequences(scratch, [located(t) for t in plan.tables])
    tables = [
        _table(scratch, plan, tp, by_name[tp.scratch_name], located(tp), old, new)
        for tp, old, new in zip(plan.tables, originals, copies, strict=True)
    ]
    return {
        "format": FORMAT,
        "made_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "job_version": __version__,
        "mode": mode,
        "scratch_schema": scratch_schema,
        "manifest": {"schema": location.schema, "table": location.table},
        "source": _source_dict(source_identity(source)),
        "allow_list_sha256": allow_list_sha256,
        "extensions": [name for name, _ in catalog.extensions],
        "types": [
            {
                "schema": t.schema,
                "name": t.name,
                "kind": "enum" if t.kind == "e" else "domain",
                "scratch_schema": where(t.schema),
                "scratch_name": t.name,
            }
            for t in sorted(catalog.copied_types, key=lambda t: (t.schema, t.name))
        ],
        "sequences": [
            {
                "schema": s.schema,
                "name": s.name,
                "scratch_schema": where(s.schema),
                "scratch_name": s.name,
            }
            for s in catalog.sequences
            if s.owner is None
        ],
        "tables": tables,
    }


def _source_dict(source: Source) -> dict[str, Any]:
    return {
        "server_version": source.server_version,
        "server_version_num": source.server_version_num,
        "system_identifier": source.system_identifier,
        "database": source.database,
    }


def _table(
    conn: psycopg.Connection[Any],
    plan: Plan,
    tp: TablePlan,
    result: TableResult,
    located: tuple[str, str],
    original_sequences: dict[str, tuple[str, str]],
    copy_sequences: dict[str, tuple[str, str]],
) -> dict[str, Any]:
    table = tp.table
    types = {
        info.qualified
        for column in table.columns
        for info in type_chain(plan.catalog, column.type_oid)
        if info.copied
    }
    return {
        "schema": table.schema,
        "name": table.name,
        "scratch_schema": located[0],
        "scratch_name": located[1],
        "rows": result.rows,
        "kept": tp.kept,
        "faked": [
            {"column": c.column.name, "type": c.column.type_sql, "fake": c.fake.as_string(conn)}
            for c in tp.columns
            if c.fake is not None and c.action == FAKED
        ],
        "set": tp.set_values,
        "pseudonymised": tp.pseudonymised,
        "structure_only": tp.structure_only,
        "note": tp.note,
        "generated": [c.column.name for c in tp.columns if c.column.generated],
        "types": sorted(types),
        "sequences": [
            {
                "column": column,
                "schema": original_sequences[column][0],
                "name": original_sequences[column][1],
                "scratch_name": name,
            }
            for column, (_, name) in copy_sequences.items()
            if column in original_sequences
        ],
        "indexes": [
            {"name": name, "scratch_name": scratch_name}
            for name, scratch_name in sorted(tp.index_names.items())
        ],
        "foreign_keys_left_out": [
            {"foreign_key": fk.describe(plan.catalog), "reason": fk.reason}
            for fk in tp.foreign_keys
            if not fk.kept
        ],
    }


def write(conn: psycopg.Connection[Any], location: Location, manifest: dict[str, Any]) -> None:
    """Create the one-row manifest table inside the open transaction of the copy."""
    schema = sql.Identifier(location.schema)
    table = sql.Identifier(location.schema, location.table)
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
    conn.execute(sql.SQL("CREATE TABLE {} (manifest json NOT NULL)").format(table))
    conn.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(table, sql.Literal(COMMENT)))
    # ASCII only: the text reads back the same whatever the dump's encoding.
    conn.execute(
        sql.SQL("INSERT INTO {} (manifest) VALUES (%s::json)").format(table),
        [json.dumps(manifest, ensure_ascii=True)],
    )


def _toc_patterns() -> list[re.Pattern[str]]:
    """Lines of `pg_restore --list` for its data: `ID; 0 OID TABLE DATA schema name owner`."""
    head = r"^\d+; \d+ \d+ TABLE DATA "
    return [
        re.compile(head + rf"(?P<schema>.+) (?P<table>{re.escape(MANIFEST_TABLE)})(?: \S*)?$"),
        re.compile(
            head + rf"(?P<schema>{re.escape(HOME.schema)}) (?P<table>{re.escape(HOME.table)})"
            r"(?: \S*)?$"
        ),
    ]


def read(pg_restore: archive.PgRestore, dump: Path) -> tuple[dict[str, Any], Location]:
    """The manifest inside a dump file, found in the archive's table of contents in either
    place; ConfigError for a dump that has none (not made by this job)."""
    found: list[tuple[archive.Entry, Location]] = []
    for entry in archive.entries(pg_restore, dump):
        for pattern in _toc_patterns():
            match = pattern.match(entry.line)
            if match:
                found.append((entry, Location(match["schema"], match["table"])))
                break
    if not found:
        raise ConfigError(
            f"{dump} is a pg_dump archive but not a sanitised dump: it carries no manifest "
            f"(no table {MANIFEST_TABLE} or {HOME.schema}.{HOME.table}); restore it with "
            "pg_restore itself"
        )
    if len(found) > 1:
        places = ", ".join(f"{loc.schema}.{loc.table}" for _, loc in found)
        raise ConfigError(f"{dump} carries more than one manifest ({places})")
    entry, location = found[0]
    rows = archive.table_data(pg_restore, dump, entry)
    try:
        (row,) = rows
        manifest = json.loads(archive.copy_field(row))
    except ValueError:
        raise ConfigError(
            f"the manifest in {dump} is damaged ({len(rows)} rows, or not JSON)"
        ) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("tables"), list):
        raise ConfigError(f"the manifest in {dump} is damaged: it lists no tables")
    if not isinstance(manifest.get("format"), int) or manifest["format"] > FORMAT:
        raise ConfigError(
            f"the manifest in {dump} has format {manifest.get('format')!r}, newer than this "
            f"version of the job ({__version__}) reads: use a newer image"
        )
    return manifest, location


def report(path: Path, header: archive.Header, manifest: dict[str, Any]) -> dict[str, Any]:
    """What `inspect` prints: the manifest with what the archive says about itself."""
    return {
        "dump": str(path),
        "archive": {
            "format": header.format,
            "version": header.archive_version,
            "compression": header.compression,
            "pg_dump_version": header.pg_dump_version,
            "needs_pg_restore": header.pg_dump_major,
        },
        "manifest": manifest,
    }


def text(report: dict[str, Any]) -> str:
    archive_info, m = report["archive"], report["manifest"]
    source = m["source"]
    tables = m["tables"]
    identity = (
        f" (system identifier {source['system_identifier']})" if source["system_identifier"] else ""
    )
    lines = [
        f"sanitised dump {report['dump']}",
        f"  made at         {m['made_at']} by sanitised-dump {m['job_version']}",
        f"  source          PostgreSQL {source['server_version']}, database "
        f"{source['database']!r}{identity}",
        f"  allow list      sha256 {m['allow_list_sha256']}",
        f"  archive         {archive_info['format']} {archive_info['version']}, "
        f"{archive_info['compression']}, pg_dump {archive_info['pg_dump_version']}",
        f"  restore needs   pg_restore {archive_info['needs_pg_restore']} or newer",
        f"  tables          {len(tables)}, {sum(t['rows'] for t in tables)} rows "
        f"(in {m['scratch_schema'] or 'their own schemas'})",
    ]
    for t in tables:
        lines.append(
            f"\n{t['schema']}.{t['name']}: {t['rows']} rows, {len(t['kept'])} kept, "
            f"{len(t['faked'])} faked (as {t['scratch_schema']}.{t['scratch_name']})"
        )
        if t.get("structure_only"):
            lines.append("  structure only: no rows")
        if t.get("note"):
            lines.append(f"  note:  {t['note']}")
        lines.append(f"  kept:  {', '.join(t['kept']) or 'none'}")
        lines += [f"  faked: {f['column']} = {f['fake']}" for f in t["faked"]]
        lines += [
            f"  set:   {column} = {json.dumps(value)}" for column, value in t.get("set", {}).items()
        ]
        if t.get("pseudonymised"):
            lines.append(f"  pseudonymised: {', '.join(t['pseudonymised'])}")
        if t["generated"]:
            lines.append(f"  generated: {', '.join(t['generated'])}")
        lines += [
            f"  foreign key left out: {fk['foreign_key']} ({fk['reason']})"
            for fk in t["foreign_keys_left_out"]
        ]
    return "\n".join(lines)
