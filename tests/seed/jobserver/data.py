"""Synthetic rows for the job-server schema fixture (54 tables, no data of its own).

`load(conn)` runs `schema.sql` in an empty database, reads the catalog it
created, and inserts `rows` rows into every table, parents before children.
Values are derived from table, column and row number only, so every load is
identical. Canary rule, as in the demo seed: every non-NULL text-like value
of a column that `allow_list.json` does not keep contains `CANARY`; kept
values never do.

The generator is driven by the catalog; the schema's constraints are met by
construction rather than by special-casing each table:

- foreign keys: every table gets the same number of rows and row `r` points at
  parent row `r` shifted by a per-column amount, a bijection, so a unique
  constraint or index that contains a foreign key column (the one-to-one
  `application_id`, `(org_id, user_id)`, the partial "one lead per project")
  holds; the self-reference `jobserver_user.created_by_id` points at row r-1;
- "both set or both NULL" CHECKs (found by their `IS NULL` terms) tie their
  columns' NULLs together, and `redirects_redirect_only_one_target_model_set`
  sets exactly one of its columns;
- every other generated value contains the row number, so single and composite
  unique constraints hold; format CHECKs get the few overrides in `_OVERRIDES`.
"""

from __future__ import annotations

import graphlib
import hashlib
import json
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

HERE = Path(__file__).resolve().parent
SCHEMA_SQL = HERE / "schema.sql"
ALLOW_LIST = HERE / "allow_list.json"
CANARY = "canary"
TABLE_COUNT = 54

BASE_TIME = datetime(2024, 3, 4, 9, 30, tzinfo=UTC)
TEXT_TYPES = frozenset({"text", "varchar", "bpchar", "citext", "name", "json", "jsonb"})
# Session settings schema.sql changes (pg_dump's preamble); reset after loading.
_SCHEMA_SETTINGS = (
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
    "search_path",
    "check_function_bodies",
    "xmloption",
    "client_min_messages",
    "row_security",
    "default_tablespace",
    "default_table_access_method",
)

_COLUMNS = """
SELECT c.relname, a.attname, t.typname, coalesce(et.typname, ''),
       CASE WHEN t.typname IN ('varchar', 'bpchar') AND a.atttypmod > 4
            THEN a.atttypmod - 4 END,
       a.attnotnull, a.attidentity <> ''
FROM pg_catalog.pg_attribute AS a
JOIN pg_catalog.pg_class AS c ON c.oid = a.attrelid
JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
JOIN pg_catalog.pg_type AS t ON t.oid = a.atttypid
LEFT JOIN pg_catalog.pg_type AS et ON et.oid = t.typelem AND t.typcategory = 'A'
WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND a.attnum > 0
  AND NOT a.attisdropped AND a.attgenerated = ''
ORDER BY c.relname, a.attnum
"""

_CONSTRAINTS = """
SELECT c.relname, co.contype, co.conname, pg_catalog.pg_get_constraintdef(co.oid),
       ARRAY(SELECT a.attname::text FROM unnest(co.conkey) WITH ORDINALITY AS k(num, ord)
             JOIN pg_catalog.pg_attribute AS a ON a.attrelid = co.conrelid AND a.attnum = k.num
             ORDER BY k.ord),
       rc.relname,
       ARRAY(SELECT a.attname::text FROM unnest(co.confkey) WITH ORDINALITY AS k(num, ord)
             JOIN pg_catalog.pg_attribute AS a ON a.attrelid = co.confrelid AND a.attnum = k.num
             ORDER BY k.ord)
FROM pg_catalog.pg_constraint AS co
JOIN pg_catalog.pg_class AS c ON c.oid = co.conrelid
JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
LEFT JOIN pg_catalog.pg_class AS rc ON rc.oid = co.confrelid
WHERE n.nspname = 'public' AND co.contype IN ('p', 'f', 'c')
ORDER BY c.relname, co.conname
"""


@dataclass(frozen=True)
class Column:
    name: str
    typname: str  # pg_type.typname; "_text" for text[]
    elem: str  # element typname of an array, else ""
    max_len: int | None  # varchar(n) / char(n)
    not_null: bool
    identity: bool

    @property
    def base(self) -> str:
        return self.elem or self.typname

    @property
    def text_like(self) -> bool:
        return self.base in TEXT_TYPES


@dataclass
class Table:
    name: str
    columns: list[Column] = field(default_factory=list)
    pk: list[str] = field(default_factory=list)
    fks: dict[str, tuple[str, str]] = field(default_factory=dict)  # col -> (table, col)
    both_groups: list[tuple[str, ...]] = field(default_factory=list)
    one_of_groups: list[tuple[str, ...]] = field(default_factory=list)


def _crc(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def _hex(*parts: object) -> str:
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _ulid(*parts: object) -> str:
    """A 26-character ULID-shaped id (job-server's text primary keys)."""
    digest = int(_hex(*parts), 16)
    tail = "".join(_CROCKFORD[(digest >> (5 * i)) & 31] for i in range(23))
    return "01H" + tail


def _when(table: str, col: str, r: int) -> datetime:
    return BASE_TIME + timedelta(days=r, minutes=_crc(table, col) % 1440)


# Values for kept columns whose content the application (or a CHECK) constrains.
_OVERRIDES: dict[tuple[str, str], Callable[[int], Any]] = {
    # number_valid_format: '^[1-9][0-9]*$|^POS-20[0-9]{2}-[1-9][0-9]{3}$', unique when set.
    ("jobserver_project", "number"): lambda r: (
        None if r % 5 == 0 else str(r) if r % 2 == 0 else f"POS-2025-{1000 + r}"
    ),
    ("jobserver_project", "status"): lambda r: ("ongoing", "completed", "postponed")[r % 3],
    ("applications_application", "status"): lambda r: ("ongoing", "approved_fully", "rejected")[
        r % 3
    ],
    ("jobserver_publishrequest", "decision"): lambda r: ("approved", "rejected")[r % 2],
    ("jobserver_release", "status"): lambda r: ("REQUESTED", "APPROVED", "REJECTED")[r % 3],
    ("jobserver_releasefilereview", "status"): lambda r: ("APPROVED", "CHANGES_REQUESTED")[r % 2],
    # name_is_valid: '^[-a-zA-Z0-9_]+\Z'
    ("jobserver_workspace", "name"): lambda r: f"study-{r}-workspace",
    ("jobserver_workspace", "branch"): lambda r: "main" if r % 3 else f"release-{r}",
    # old_url_endswith_and_startswith_slash
    ("redirects_redirect", "old_url"): lambda r: f"/orgs/old-slug-{r}/",
    ("jobserver_sitealert", "level"): lambda r: ("info", "warning", "danger")[r % 3],
    ("jobserver_job", "status"): lambda r: ("pending", "running", "succeeded", "failed")[r % 4],
    ("jobserver_jobrequest", "_status"): lambda r: ("pending", "running", "succeeded")[r % 3],
    ("jobserver_jobrequest", "requested_actions"): lambda r: ["generate_dataset", f"model_{r}"],
    ("jobserver_jobrequest", "cancelled_actions"): lambda r: [] if r % 4 else [f"model_{r}"],
    ("jobserver_job", "run_command"): lambda r: f"ehrql:v1 generate-dataset analysis/d{r}.py",
    ("jobserver_user", "roles"): lambda r: [["OutputChecker"], [], ["StaffAreaAdministrator"]][
        r % 3
    ],
    ("jobserver_projectmembership", "roles"): lambda r: [["ProjectDeveloper"], []][r % 2],
    ("jobserver_org", "github_orgs"): lambda r: ["opensafely"] if r % 2 else [],
    ("jobserver_backend", "alert_timeout"): lambda r: timedelta(minutes=5 * (1 + r % 12)),
    ("social_auth_usersocialauth", "provider"): lambda r: "github",
    ("social_auth_usersocialauth", "uid"): lambda r: str(1_000_000 + r),
    ("social_auth_partial", "backend"): lambda r: "github",
    ("social_auth_association", "assoc_type"): lambda r: "HMAC-SHA1",
    ("django_migrations", "app"): lambda r: ("jobserver", "applications", "auth")[r % 3],
    ("django_migrations", "name"): lambda r: f"{r:04d}_auto_2024",
    ("django_content_type", "app_label"): lambda r: ("jobserver", "applications")[r % 2],
    ("django_content_type", "model"): lambda r: f"model{r}",
    ("auth_permission", "codename"): lambda r: f"view_model{r}",
    # The five categories the application knows; the original value is a canary.
    ("jobserver_project", "category"): lambda r: (
        "canary-" + ("internal", "legacy", "legacy_approved", "approved", "unknown")[r % 5]
    ),
}


def _text_by_name(table: str, col: str, r: int, faked: bool) -> str:
    """A plausible string for a column, from its name; canaried when faked."""
    c = CANARY if faked else ""
    if "email" in col:
        return f"user{r}+{c}@example.org" if faked else f"user{r}@example.org"
    if col == "telephone":
        return f"+44 7700 {c} {900000 + r}"
    if col == "phone_type":
        return f"{c}-mobile" if faked else "mobile"
    if col == "password":
        return f"pbkdf2_sha256$720000${c}{r}${_hex(table, col, r)[:43]}"
    if "token" in col or col in ("secret", "salt", "code", "session_data"):
        return (c + _hex(table, col, r))[:32]
    if col in ("sha", "filehash"):
        return _hex(table, col, r)[: 40 if col == "sha" else 64]
    if col == "identifier":
        return _hex(table, col, r)[:16]
    if col in ("slug", "username", "github_username"):
        return f"{c}{table.rsplit('_', 1)[-1]}-{r}"
    if col in ("url", "server_url", "daa"):
        return f"https://github.com/opensafely/{c}study-{r}"
    if col == "path":
        return f"output/{c}table-{r}.csv"
    if col == "logo_file":
        return f"org_logos/{c}logo-{r}.png"
    label = col.replace("_", " ").strip()
    return f"{label} {c} {r}" if faked else f"{label} {r}"


def _json(table: str, col: str, r: int, faked: bool) -> Any:
    if faked:
        return {"note": f"{CANARY} {col} {r}", "items": [f"{CANARY}-{r}"]}
    return {"source": f"{table}.{col}", "n": r, "items": [f"{col}-{r}"]}


def _value(table: str, col: Column, r: int, faked: bool) -> Any:
    override = _OVERRIDES.get((table, col.name))
    if override is not None:
        value = override(r)
    elif col.base in ("json", "jsonb"):
        value = _json(table, col.name, r, faked)
    elif col.elem:
        if col.elem not in TEXT_TYPES:
            raise NotImplementedError(f"{table}.{col.name}: arrays of {col.elem}")
        value = [_text_by_name(table, col.name, r, faked)]
    elif col.text_like:
        value = _text_by_name(table, col.name, r, faked)
    elif col.base == "bool":
        value = (r + _crc(table, col.name)) % 2 == 0
    elif col.base == "int2":
        value = (r * 7 + _crc(table, col.name)) % 100
    elif col.base in ("int4", "int8"):
        value = 1 + (r * 37 + _crc(table, col.name)) % 100_000
    elif col.base == "timestamptz":
        value = _when(table, col.name, r)
    elif col.base == "interval":
        value = timedelta(hours=1 + r % 48)
    else:
        raise NotImplementedError(f"{table}.{col.name}: type {col.typname}")
    if value is not None:
        _check(table, col, value, faked)
    if col.base in ("json", "jsonb") and value is not None:
        value = Jsonb(value)
    return value


def _check(table: str, col: Column, value: Any, faked: bool) -> None:
    """Keep the canary rule and the column's length at the source of every value."""
    if col.text_like:
        text = json.dumps(value) if col.base in ("json", "jsonb") else value
        items = value if isinstance(value, list) and col.elem else [text]
        for item in items:
            if faked and CANARY not in item:
                raise AssertionError(f"{table}.{col.name}: faked value without canary: {item!r}")
            if col.max_len is not None and len(item) > col.max_len:
                raise AssertionError(f"{table}.{col.name}: {item!r} exceeds {col.max_len}")
    if not faked and CANARY in str(value):
        raise AssertionError(f"{table}.{col.name}: kept value contains canary: {value!r}")


def _catalog(conn: psycopg.Connection[Any]) -> dict[str, Table]:
    tables: dict[str, Table] = {}
    for relname, attname, typname, elem, max_len, not_null, identity in conn.execute(_COLUMNS):
        table = tables.setdefault(relname, Table(relname))
        table.columns.append(Column(attname, typname, elem, max_len, not_null, identity))
    for relname, contype, conname, definition, cols, ref_table, ref_cols in conn.execute(
        _CONSTRAINTS
    ):
        table = tables[relname]
        if contype == "p":
            table.pk = list(cols)
        elif contype == "f":
            if len(cols) != 1:
                raise NotImplementedError(f"{relname}.{conname}: multi-column foreign key")
            table.fks[cols[0]] = (ref_table, ref_cols[0])
        else:
            null_terms = tuple(
                dict.fromkeys(re.findall(r"\(?(\w+)\)? IS (?:NOT )?NULL", definition))
            )
            if "only_one" in conname:
                table.one_of_groups.append(null_terms)
            elif "both" in conname and len(null_terms) > 1:
                table.both_groups.append(null_terms)
    return tables


def _order(tables: dict[str, Table]) -> list[str]:
    """Parents before children (self-references aside); sorted names break ties."""
    sorter: graphlib.TopologicalSorter[str] = graphlib.TopologicalSorter()
    for name in sorted(tables):
        sorter.add(name, *sorted({ref for ref, _ in tables[name].fks.values()} - {name}))
    return list(sorter.static_order())


def _null_columns(table: Table, r: int) -> set[str]:
    """The columns that are NULL in row r, keeping the schema's NULL CHECKs."""
    cols = {c.name: c for c in table.columns}
    grouped: set[str] = set()
    nulls: set[str] = set()
    for group in table.one_of_groups:
        chosen = group[r % len(group)]
        nulls.update(name for name in group if name != chosen)
        grouped.update(group)
    for group in table.both_groups:
        grouped.update(group)
        if (
            all(not cols[name].not_null for name in group)
            and (_crc(table.name, group) + r) % 3 == 0
        ):
            nulls.update(group)
    for col in table.columns:
        if col.name in grouped or col.not_null:
            continue
        if (_crc(table.name, col.name) + r) % 4 == 0:
            nulls.add(col.name)
    return nulls


def _rows(
    table: Table, count: int, keys: dict[str, list[Any]], kept: set[str]
) -> tuple[list[str], list[list[Any]]]:
    names = [c.name for c in table.columns]
    out: list[list[Any]] = []
    own_keys: list[Any] = []
    for r in range(1, count + 1):
        nulls = _null_columns(table, r)
        row: list[Any] = []
        for col in table.columns:
            faked = col.name not in kept
            if col.name in nulls:
                value = None
            elif col.name in table.pk and col.base in ("int2", "int4", "int8"):
                value = r
            elif col.name in table.pk:
                value = _ulid(table.name, r) if col.max_len == 26 else _hex(table.name, r)[:32]
                value = CANARY + value[len(CANARY) :] if faked else value
            elif col.name in table.fks:
                ref_table, _ = table.fks[col.name]
                if ref_table == table.name:
                    value = own_keys[-1] if own_keys else None
                else:
                    parent = keys[ref_table]
                    value = parent[(r - 1 + _crc(table.name, col.name)) % len(parent)]
            else:
                value = _value(table.name, col, r, faked)
            if value is None and col.not_null:
                raise AssertionError(f"{table.name}.{col.name}: NULL in a NOT NULL column")
            row.append(value)
        own_keys.append(row[names.index(table.pk[0])])
        out.append(row)
    keys[table.name] = own_keys
    return names, out


def allow_list() -> dict[str, list[str]]:
    data: dict[str, list[str]] = json.loads(ALLOW_LIST.read_text(encoding="utf-8"))
    return data


def load(conn: psycopg.Connection[Any], rows: int = 20) -> None:
    """Create the job-server schema in the empty database of `conn`, fill it, and commit."""
    if not 1 <= rows <= 8999:  # jobserver_project.number: 'POS-20yy-1000+r' has 4 digits
        raise ValueError("rows must be between 1 and 8999")
    conn.execute(SCHEMA_SQL.read_text(encoding="utf-8"))
    for name in _SCHEMA_SETTINGS:
        conn.execute(sql.SQL("RESET {}").format(sql.Identifier(name)))
    tables = _catalog(conn)
    if len(tables) != TABLE_COUNT:
        raise AssertionError(f"schema.sql made {len(tables)} tables, expected {TABLE_COUNT}")
    kept = allow_list()
    keys: dict[str, list[Any]] = {}
    with conn.cursor() as cur:
        for name in _order(tables):
            table = tables[name]
            columns, values = _rows(table, rows, keys, set(kept.get(name, [])))
            insert = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
                sql.Identifier("public", name),
                sql.SQL(", ").join(map(sql.Identifier, columns)),
                sql.SQL(", ").join(sql.Placeholder() * len(columns)),
            )
            cur.executemany(insert, values)
            for col in table.columns:
                if col.identity:
                    cur.execute(
                        sql.SQL("SELECT setval(pg_get_serial_sequence({}, {}), {})").format(
                            sql.Literal(f"public.{name}"), sql.Literal(col.name), rows
                        )
                    )
    conn.commit()
