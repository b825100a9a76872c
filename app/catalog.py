"""What the live database says about the allow-listed tables.

Everything is read inside the copy's snapshot, before anything is written. Expressions
(defaults, CHECKs, index definitions) are deparsed with `search_path` set to the source
schemas, so that names of copied objects come out unqualified and resolve to their scratch
copies when the DDL runs with the scratch schema first on the path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from app.allowlist import AllowList, TableEntry
from app.errors import AllowListMismatch

SYSTEM_SCHEMAS = ("pg_catalog", "information_schema")

RESOLVE_TABLES = """
SELECT e.ord, c.oid, c.relkind, c.relispartition,
       pg_table_size(c.oid) + pg_indexes_size(c.oid) AS size,
       (SELECT string_agg(quote_ident(n2.nspname) || '.' || quote_ident(c2.relname), ', ')
          FROM pg_class c2 JOIN pg_namespace n2 ON n2.oid = c2.relnamespace
         WHERE lower(c2.relname) = lower(e.rel) AND c2.relkind IN ('r', 'p')
           AND c.oid IS NULL) AS similar
FROM unnest(%(schemas)s::text[], %(tables)s::text[]) WITH ORDINALITY AS e(nsp, rel, ord)
LEFT JOIN pg_namespace n ON n.nspname = e.nsp
LEFT JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = e.rel
ORDER BY e.ord
"""

COLUMNS = """
SELECT a.attrelid AS rel, a.attnum, a.attname, a.atttypid, a.atttypmod, a.attnotnull,
       a.attgenerated, a.attidentity,
       format_type(a.atttypid, a.atttypmod) AS type_sql,
       CASE WHEN a.attcollation <> 0 AND a.attcollation <> t.typcollation
            THEN quote_ident(cn.nspname) || '.' || quote_ident(co.collname) END AS collation,
       pg_get_expr(d.adbin, d.adrelid) AS default_sql
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_collation co ON co.oid = a.attcollation
LEFT JOIN pg_namespace cn ON cn.oid = co.collnamespace
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = ANY(%(rels)s) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attrelid, a.attnum
"""

TYPES = """
WITH RECURSIVE used(oid) AS (
    SELECT unnest(%(types)s::oid[])
  UNION
    SELECT x.oid
    FROM used u
    JOIN pg_type t ON t.oid = u.oid
    CROSS JOIN LATERAL (VALUES (t.typbasetype),
                               (CASE WHEN t.typsubscript = 'array_subscript_handler'::regproc
                                     THEN t.typelem END),
                               ((SELECT r.rngsubtype FROM pg_range r WHERE r.rngtypid = t.oid)))
         AS x(oid)
    WHERE x.oid IS NOT NULL AND x.oid <> 0
)
SELECT t.oid, n.nspname AS schema, t.typname AS name, t.typtype AS kind,
       t.typsubscript = 'array_subscript_handler'::regproc AS is_array,
       t.typelem AS element, t.typbasetype AS base, t.typtypmod AS typmod,
       t.typnotnull AS not_null, format_type(t.oid, NULL) AS type_sql,
       format_type(t.typbasetype, t.typtypmod) AS base_sql,
       pg_get_expr(t.typdefaultbin, 0) AS default_sql,
       CASE WHEN t.typcollation <> 0 AND t.typcollation <> bt.typcollation
            THEN quote_ident(cn.nspname) || '.' || quote_ident(co.collname) END AS collation,
       (SELECT e.extname FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
         WHERE d.classid = 'pg_type'::regclass AND d.objid = t.oid AND d.deptype = 'e'
           AND d.refclassid = 'pg_extension'::regclass) AS extension,
       (SELECT array_agg(e.enumlabel ORDER BY e.enumsortorder)
          FROM pg_enum e WHERE e.enumtypid = t.oid) AS labels,
       (SELECT r.rngsubtype FROM pg_range r WHERE r.rngtypid = t.oid) AS range_subtype,
       (SELECT json_agg(json_build_array(c.conname, pg_get_constraintdef(c.oid))
                        ORDER BY c.conname)
          FROM pg_constraint c WHERE c.contypid = t.oid AND c.contype = 'c') AS checks
FROM used
JOIN pg_type t ON t.oid = used.oid
JOIN pg_namespace n ON n.oid = t.typnamespace
LEFT JOIN pg_type bt ON bt.oid = t.typbasetype
LEFT JOIN pg_collation co ON co.oid = t.typcollation
LEFT JOIN pg_namespace cn ON cn.oid = co.collnamespace
"""

CONSTRAINTS = """
SELECT c.conrelid AS rel, c.conname, c.contype, pg_get_constraintdef(c.oid) AS definition,
       c.convalidated, c.conkey, c.confrelid, c.confkey, c.confupdtype, c.confdeltype,
       c.confmatchtype, c.condeferrable, c.condeferred
FROM pg_constraint c
WHERE c.conrelid = ANY(%(rels)s) AND c.contype IN ('c', 'p', 'u', 'x', 'f')
ORDER BY c.conrelid, c.contype, c.conname
"""

INDEXES = """
SELECT i.indrelid AS rel, ci.relname AS name, pg_get_indexdef(i.indexrelid) AS definition,
       i.indisunique AS is_unique, i.indkey::int2[] AS keys,
       quote_ident(n.nspname) || '.' || quote_ident(ct.relname) AS qualified,
       i.indrelid::regclass::text AS visible,
       EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid
                AND c.conrelid = i.indrelid AND c.contype IN ('p', 'u', 'x')) AS of_constraint
FROM pg_index i
JOIN pg_class ci ON ci.oid = i.indexrelid
JOIN pg_class ct ON ct.oid = i.indrelid
JOIN pg_namespace n ON n.oid = ct.relnamespace
WHERE i.indrelid = ANY(%(rels)s)
ORDER BY i.indrelid, ci.relname
"""

SEQUENCES = """
SELECT d.adrelid AS rel, d.adnum AS attnum, s.oid, ns.nspname AS schema, s.relname AS name,
       format_type(q.seqtypid, NULL) AS type_sql, q.seqstart, q.seqincrement, q.seqmax,
       q.seqmin, q.seqcycle,
       EXISTS (SELECT 1 FROM pg_depend o WHERE o.classid = 'pg_class'::regclass
                AND o.objid = s.oid AND o.refobjid = d.adrelid AND o.refobjsubid = d.adnum
                AND o.deptype = 'a') AS owned
FROM pg_attrdef d
JOIN pg_depend dep ON dep.classid = 'pg_attrdef'::regclass AND dep.objid = d.oid
     AND dep.refclassid = 'pg_class'::regclass
JOIN pg_class s ON s.oid = dep.refobjid AND s.relkind = 'S'
JOIN pg_namespace ns ON ns.oid = s.relnamespace
JOIN pg_sequence q ON q.seqrelid = s.oid
WHERE d.adrelid = ANY(%(rels)s)
"""

# User functions (not built in, not from an extension) that a default, CHECK, index or
# domain of a copied table calls: the scratch copy would depend on the source schema.
FUNCTIONS = """
SELECT DISTINCT p.oid::regprocedure::text AS function, d.classid::regclass::text AS used_by,
       COALESCE(ad.adrelid, co.conrelid, ix.indrelid)::regclass::text AS rel,
       COALESCE(co.conname, ixc.relname, a.attname, co.contypid::regtype::text) AS what
FROM pg_depend d
JOIN pg_proc p ON d.refclassid = 'pg_proc'::regclass AND p.oid = d.refobjid
LEFT JOIN pg_attrdef ad ON d.classid = 'pg_attrdef'::regclass AND ad.oid = d.objid
LEFT JOIN pg_attribute a ON a.attrelid = ad.adrelid AND a.attnum = ad.adnum
LEFT JOIN pg_constraint co ON d.classid = 'pg_constraint'::regclass AND co.oid = d.objid
LEFT JOIN pg_index ix ON d.classid = 'pg_class'::regclass AND ix.indexrelid = d.objid
LEFT JOIN pg_class ixc ON ixc.oid = ix.indexrelid
WHERE p.pronamespace <> 'pg_catalog'::regnamespace
  AND NOT EXISTS (SELECT 1 FROM pg_depend e WHERE e.classid = 'pg_proc'::regclass
                   AND e.objid = p.oid AND e.deptype = 'e')
  AND (ad.adrelid = ANY(%(rels)s) OR co.conrelid = ANY(%(rels)s)
       OR co.contypid = ANY(%(types)s) OR ix.indrelid = ANY(%(rels)s))
ORDER BY 1, 2, 3
"""

UNLISTED = """
SELECT n.nspname AS schema, c.relname AS name
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%%'
  AND n.nspname <> %(scratch)s AND NOT (c.oid = ANY(%(rels)s))
  AND NOT EXISTS (SELECT 1 FROM pg_depend e WHERE e.classid = 'pg_class'::regclass
                   AND e.objid = c.oid AND e.deptype = 'e')
ORDER BY 1, 2
"""

EXTENSIONS = """
SELECT DISTINCT e.extname, en.nspname AS schema
FROM pg_extension e JOIN pg_namespace en ON en.oid = e.extnamespace
JOIN pg_depend d ON d.refclassid = 'pg_extension'::regclass AND d.refobjid = e.oid
     AND d.deptype = 'e'
WHERE (d.classid = 'pg_type'::regclass AND d.objid = ANY(%(types)s))
   OR (d.classid = 'pg_proc'::regclass AND d.objid IN (
         SELECT refobjid FROM pg_depend x
         WHERE x.refclassid = 'pg_proc'::regclass
           AND ((x.classid = 'pg_attrdef'::regclass
                 AND x.objid IN (SELECT oid FROM pg_attrdef WHERE adrelid = ANY(%(rels)s)))
             OR (x.classid = 'pg_constraint'::regclass
                 AND x.objid IN (SELECT oid FROM pg_constraint WHERE conrelid = ANY(%(rels)s)))
             OR (x.classid = 'pg_class'::regclass
                 AND x.objid IN (SELECT indexrelid FROM pg_index WHERE indrelid = ANY(%(rels)s))))))
ORDER BY 1
"""


@dataclass(frozen=True)
class TypeInfo:
    oid: int
    schema: str
    name: str
    kind: str  # pg_type.typtype: b base, e enum, d domain, r range, c composite, m multirange
    is_array: bool
    element: int
    base: int
    typmod: int
    not_null: bool
    type_sql: str
    base_sql: str
    default_sql: str | None
    collation: str | None
    extension: str | None
    labels: tuple[str, ...]
    range_subtype: int | None
    checks: tuple[tuple[str, str], ...]

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def copied(self) -> bool:
        """Enums and domains of the application are recreated in the scratch schema."""
        return self.schema not in SYSTEM_SCHEMAS and self.extension is None and self.kind in "ed"


@dataclass(frozen=True)
class SequenceInfo:
    oid: int
    schema: str
    name: str
    type_sql: str
    start: int
    increment: int
    maximum: int
    minimum: int
    cycle: bool
    owner: tuple[int, int] | None  # (table oid, attnum) when OWNED BY a column (serial)


@dataclass(frozen=True)
class Column:
    attnum: int
    name: str
    type_oid: int
    typmod: int
    type_sql: str
    not_null: bool
    generated: str  # '' or 's' (stored) or 'v' (virtual, 18+)
    identity: str  # '' or 'a' (ALWAYS) or 'd' (BY DEFAULT)
    collation: str | None
    default_sql: str | None
    kept: bool
    sequence: SequenceInfo | None = None  # the serial sequence its default draws from


@dataclass(frozen=True)
class Constraint:
    name: str
    kind: str  # c check, p primary key, u unique, x exclusion, f foreign key
    definition: str
    validated: bool
    columns: tuple[int, ...]
    ref_table: int = 0
    ref_columns: tuple[int, ...] = ()
    on_update: str = "a"
    on_delete: str = "a"
    match: str = "s"
    deferrable: bool = False
    deferred: bool = False


@dataclass(frozen=True)
class Index:
    name: str
    unique: bool
    columns: tuple[int, ...]  # 0 stands for an expression
    method_sql: str  # the definition from `USING` on, table-agnostic
    of_constraint: bool


@dataclass
class Table:
    entry: TableEntry
    oid: int
    schema: str
    name: str
    relkind: str
    size: int
    columns: list[Column] = field(default_factory=list)
    constraints: list[Constraint] = field(default_factory=list)
    indexes: list[Index] = field(default_factory=list)

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    def column(self, attnum: int) -> Column:
        return next(c for c in self.columns if c.attnum == attnum)

    @property
    def primary_key(self) -> tuple[str, ...]:
        for con in self.constraints:
            if con.kind == "p":
                return tuple(self.column(a).name for a in con.columns)
        return ()

    def is_unique(self, column: Column) -> bool:
        """In any unique index, so its fakes must be distinct."""
        return any(ix.unique and column.attnum in ix.columns for ix in self.indexes)

    @property
    def faked(self) -> list[Column]:
        return [c for c in self.columns if not c.kept and not c.generated]


@dataclass(frozen=True)
class FunctionUse:
    function: str
    relation: str
    what: str


@dataclass
class Catalog:
    """The listed tables and everything their copy needs, as the source has them."""

    server_version: int
    tables: list[Table]
    types: dict[int, TypeInfo]
    sequences: list[SequenceInfo]
    functions: list[FunctionUse]
    extensions: list[tuple[str, str]]
    unlisted: list[tuple[str, str]]
    search_path: str

    def table(self, oid: int) -> Table | None:
        return next((t for t in self.tables if t.oid == oid), None)

    @property
    def copied_types(self) -> list[TypeInfo]:
        return [t for t in self.types.values() if t.copied]


def source_search_path(schemas: Sequence[str]) -> str:
    names = dict.fromkeys(s for s in schemas if s not in SYSTEM_SCHEMAS)
    return ", ".join(_quote_ident(s) for s in names) or "pg_catalog"


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def read(conn: psycopg.Connection[Any], allow: AllowList, scratch_schema: str) -> Catalog:
    """Resolve every allow list entry against the catalog; raise AllowListMismatch naming
    each entry, column or type that does not fit."""
    entries = allow.entries
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            RESOLVE_TABLES,
            {"schemas": [e.schema for e in entries], "tables": [e.table for e in entries]},
        )
        rows = cur.fetchall()
        problems = []
        tables: list[Table] = []
        for entry, row in zip(entries, rows, strict=True):
            if row["oid"] is None:
                hint = f" (did you mean {row['similar']}?)" if row["similar"] else ""
                problems.append(
                    f"table {entry.qualified!r} (entry {entry.key!r}) does not exist{hint}"
                )
            elif row["relkind"] not in ("r", "p"):
                problems.append(
                    f"{entry.qualified!r} (entry {entry.key!r}) is not a table (relkind "
                    f"{row['relkind']!r}): only tables can be copied"
                )
            else:
                tables.append(
                    Table(entry, row["oid"], entry.schema, entry.table, row["relkind"], row["size"])
                )

        # Deparse with the source schemas on the path: copied objects print unqualified.
        cur.execute("SELECT current_setting('server_version_num')::int AS v")
        version = _one(cur)["v"]
        schemas = [t.schema for t in tables]
        rels = [t.oid for t in tables]
        by_oid = {t.oid: t for t in tables}

        cur.execute(
            "SELECT n.nspname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace"
            " JOIN pg_attribute a ON a.atttypid = t.oid WHERE a.attrelid = ANY(%(rels)s)"
            " AND a.attnum > 0 AND NOT a.attisdropped AND t.typtype IN ('e', 'd')",
            {"rels": rels},
        )
        schemas += [r["nspname"] for r in cur.fetchall()]
        path = source_search_path(schemas)
        cur.execute("SELECT set_config('search_path', %s, true)", [path])

        cur.execute(SEQUENCES, {"rels": rels})
        sequences: dict[tuple[int, int], SequenceInfo] = {}
        all_sequences: dict[int, SequenceInfo] = {}
        for r in cur.fetchall():
            seq = SequenceInfo(
                oid=r["oid"],
                schema=r["schema"],
                name=r["name"],
                type_sql=r["type_sql"],
                start=r["seqstart"],
                increment=r["seqincrement"],
                maximum=r["seqmax"],
                minimum=r["seqmin"],
                cycle=r["seqcycle"],
                owner=(r["rel"], r["attnum"]) if r["owned"] else None,
            )
            all_sequences.setdefault(seq.oid, seq)
            sequences[r["rel"], r["attnum"]] = seq

        cur.execute(COLUMNS, {"rels": rels})
        for r in cur.fetchall():
            table = by_oid[r["rel"]]
            table.columns.append(
                Column(
                    attnum=r["attnum"],
                    name=r["attname"],
                    type_oid=r["atttypid"],
                    typmod=r["atttypmod"],
                    type_sql=r["type_sql"],
                    not_null=r["attnotnull"],
                    generated=r["attgenerated"],
                    identity=r["attidentity"],
                    collation=r["collation"],
                    default_sql=r["default_sql"],
                    kept=r["attname"] in table.entry.keep,
                    sequence=sequences.get((r["rel"], r["attnum"])),
                )
            )
        for table in tables:
            names = {c.name for c in table.columns}
            entry = table.entry
            for role, columns in (
                ("", entry.keep),
                (", set", [c for c, _ in entry.set_values]),
                (", pseudonymised", entry.pseudonymise),
            ):
                for name in columns:
                    if name not in names:
                        problems.append(
                            f"column {name!r} of table {table.qualified!r} (entry "
                            f"{entry.key!r}{role}) does not exist"
                        )
        if problems:
            raise AllowListMismatch("allow list does not fit the database: " + "; ".join(problems))

        type_oids = sorted({c.type_oid for t in tables for c in t.columns})
        cur.execute(TYPES, {"types": type_oids})
        types = {r["oid"]: _type(r) for r in cur.fetchall()}

        cur.execute(CONSTRAINTS, {"rels": rels})
        for r in cur.fetchall():
            by_oid[r["rel"]].constraints.append(
                Constraint(
                    name=r["conname"],
                    kind=r["contype"],
                    definition=r["definition"],
                    validated=r["convalidated"],
                    columns=tuple(r["conkey"] or ()),
                    ref_table=r["confrelid"],
                    ref_columns=tuple(r["confkey"] or ()),
                    on_update=r["confupdtype"],
                    on_delete=r["confdeltype"],
                    match=r["confmatchtype"],
                    deferrable=r["condeferrable"],
                    deferred=r["condeferred"],
                )
            )

        cur.execute(INDEXES, {"rels": rels})
        for r in cur.fetchall():
            by_oid[r["rel"]].indexes.append(
                Index(
                    name=r["name"],
                    unique=r["is_unique"],
                    columns=tuple(r["keys"]),
                    method_sql=_index_method(r),
                    of_constraint=r["of_constraint"],
                )
            )

        copied_domains = [t.oid for t in types.values() if t.copied and t.kind == "d"]
        cur.execute(FUNCTIONS, {"rels": rels, "types": copied_domains})
        functions = [FunctionUse(r["function"], r["rel"] or "", r["what"] or "") for r in cur]

        cur.execute(EXTENSIONS, {"rels": rels, "types": list(types)})
        extensions = [(r["extname"], r["schema"]) for r in cur.fetchall()]

        cur.execute(UNLISTED, {"scratch": scratch_schema, "rels": rels})
        unlisted = [(r["schema"], r["name"]) for r in cur.fetchall()]
        cur.execute("SELECT set_config('search_path', %s, true)", [path])

    return Catalog(
        server_version=version,
        tables=tables,
        types=types,
        sequences=list(all_sequences.values()),
        functions=functions,
        extensions=extensions,
        unlisted=unlisted,
        search_path=path,
    )


def _one(cur: psycopg.Cursor[dict[str, Any]]) -> dict[str, Any]:
    row = cur.fetchone()
    assert row is not None
    return row


def _type(r: dict[str, Any]) -> TypeInfo:
    return TypeInfo(
        oid=r["oid"],
        schema=r["schema"],
        name=r["name"],
        kind=r["kind"],
        is_array=bool(r["is_array"]),
        element=r["element"],
        base=r["base"],
        typmod=r["typmod"],
        not_null=r["not_null"],
        type_sql=r["type_sql"],
        base_sql=r["base_sql"],
        default_sql=r["default_sql"],
        collation=r["collation"],
        extension=r["extension"],
        labels=tuple(r["labels"] or ()),
        range_subtype=r["range_subtype"],
        checks=tuple((c[0], c[1]) for c in r["checks"] or ()),
    )


def _index_method(r: dict[str, Any]) -> str:
    """Cut `CREATE [UNIQUE] INDEX name ON [ONLY] table ` off an index definition."""
    definition: str = r["definition"]
    for table in (r["qualified"], r["visible"]):
        for only in ("", "ONLY "):
            head = f" ON {only}{table} USING "
            at = definition.find(head)
            if at != -1:
                return "USING " + definition[at + len(head) :]
    raise AllowListMismatch(f"cannot read the definition of index {r['name']!r}: {definition}")


def as_sql(text: str) -> sql.SQL:
    """Catalog-deparsed SQL text (never allow list input) to compose into a statement."""
    return sql.SQL(text)
