"""The allow list: table -> columns safe to keep verbatim (SPEC §3), or an object that also
sets values, pseudonymises columns, or copies a table's structure without its rows.

Only the file is checked here; whether the names exist is the catalog's business. The JSON
Schema beside this module (`allow_list.schema.json`) describes the same format for editors
and for `check`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from app.errors import ConfigError

SCHEMA_FILE = "allow_list.schema.json"
# Table object keys, in the order the documentation gives them.
KEYS = ("keep", "set", "rows", "note", "pseudonymise")
ROW_NUMBER = "{n}"


@dataclass(frozen=True)
class SetValue:
    """A `set` value: the JSON the reviewer wrote, and the text the server casts to the
    column's type (None: SQL NULL). `{n}` in a string stands for the row's number."""

    raw: Any
    text: str | None

    @property
    def numbered(self) -> bool:
        return self.text is not None and ROW_NUMBER in self.text

    def sample(self, n: int = 1) -> str | None:
        """The text for row `n`, as the copy would compute it."""
        return None if self.text is None else self.text.replace(ROW_NUMBER, str(n))


@dataclass(frozen=True)
class TableEntry:
    """One allow list entry: a table, the columns kept verbatim, and the object form's
    choices (columns set to a value, pseudonymised columns, no rows, the reviewer's note)."""

    key: str
    schema: str
    table: str
    keep: tuple[str, ...]
    set_values: tuple[tuple[str, SetValue], ...] = ()
    pseudonymise: tuple[str, ...] = ()
    structure_only: bool = False
    note: str | None = None

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.table}"

    @property
    def named_columns(self) -> tuple[str, ...]:
        """Every column the entry names, which must all exist."""
        return self.keep + tuple(name for name, _ in self.set_values) + self.pseudonymise

    def set_value(self, column: str) -> SetValue | None:
        return next((v for name, v in self.set_values if name == column), None)


@dataclass(frozen=True)
class AllowList:
    path: Path
    entries: tuple[TableEntry, ...]
    sha256: str
    document: Any = None  # the parsed JSON, for the schema check

    @property
    def pseudonymised(self) -> bool:
        return any(e.pseudonymise for e in self.entries)


def split_key(key: str) -> tuple[str, str]:
    """`"table"` is in public; `"schema.table"` splits at the first dot."""
    schema, dot, table = key.partition(".")
    return (schema, table) if dot else ("public", key)


def load(path: Path) -> AllowList:
    """Read and validate the allow list file; every problem raises ConfigError naming it."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"allow list {path} does not exist (set ALLOW_LIST)") from None
    except OSError as exc:
        raise ConfigError(f"allow list {path} cannot be read: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"allow list {path} is not UTF-8") from None
    if not text.strip():
        raise ConfigError(f"allow list {path} is empty")
    try:
        document = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        raise ConfigError(f"allow list {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"allow list {path} is not valid JSON: {exc.msg} "
            f"at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise ConfigError(f"allow list {path} is nested too deeply to be an allow list") from None
    entries = parse(document, path)
    return AllowList(
        path=path, entries=entries, sha256=hashlib.sha256(raw).hexdigest(), document=document
    )


def parse(document: Any, path: Path | str = "allow list") -> tuple[TableEntry, ...]:
    if not isinstance(document, dict):
        raise ConfigError(
            f"allow list {path} must be a JSON object of table -> list of columns, "
            f"not a {type(document).__name__}"
        )
    if "$schema" in document and not isinstance(document["$schema"], str):
        raise ConfigError(f'allow list {path}: "$schema" must be a string (the schema\'s URI)')
    tables = {k: v for k, v in document.items() if k != "$schema"}
    if not tables:
        raise ConfigError(f"allow list {path} lists no tables")
    entries: list[TableEntry] = []
    seen: dict[tuple[str, str], str] = {}
    for key, value in tables.items():
        where = f"allow list {path}, entry {key!r}"
        schema, table = split_key(key)
        if not schema or not table or not _is_name(key):
            raise ConfigError(f'{where}: not a table name (use "table" or "schema.table")')
        if (schema, table) in seen:
            raise ConfigError(f"{where}: names the same table as entry {seen[schema, table]!r}")
        seen[schema, table] = key
        if isinstance(value, list):
            entries.append(TableEntry(key, schema, table, _columns(value, where, "")))
        elif isinstance(value, dict):
            entries.append(_table_object(key, schema, table, value, where))
        else:
            raise ConfigError(
                f"{where}: the value must be a list of column names, not {_kind(value)} (or an "
                f"object with {', '.join(KEYS)})"
            )
    return tuple(entries)


def _table_object(
    key: str, schema: str, table: str, value: dict[str, Any], where: str
) -> TableEntry:
    for name in value:
        if name not in KEYS:
            close = difflib.get_close_matches(name, KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{where}: unknown key {name!r}{hint}; a table's object may have {', '.join(KEYS)}"
            )
    rows = value.get("rows")
    structure_only = "rows" in value
    if structure_only and rows != "none":
        raise ConfigError(
            f'{where}: "rows" can only be "none" (the table\'s structure without its rows), '
            f"not {json.dumps(rows)}"
        )
    if structure_only:
        for name in ("keep", "set", "pseudonymise"):
            if name in value:
                raise ConfigError(
                    f'{where}: "rows": "none" copies no rows, so "{name}" has nothing to act '
                    f"on; remove one of them"
                )
    note = value.get("note")
    if "note" in value and not isinstance(note, str):
        raise ConfigError(f'{where}: "note" must be a string, not {_kind(note)}')
    keep = _columns(value.get("keep", []), where, "keep")
    pseudonymise = _columns(value.get("pseudonymise", []), where, "pseudonymise")
    raw_set = value.get("set", {})
    if not isinstance(raw_set, dict):
        raise ConfigError(
            f'{where}: "set" must be an object of column -> value, not {_kind(raw_set)}'
        )
    set_values: list[tuple[str, SetValue]] = []
    for column, raw in raw_set.items():
        _column_name(column, where, "set")
        set_values.append((column, SetValue(raw, _as_text(raw))))
    roles: dict[str, str] = {}
    for role, columns in (
        ("kept", keep),
        ("set", [c for c, _ in set_values]),
        ("pseudonymised", pseudonymise),
    ):
        for column in columns:
            if column in roles:
                raise ConfigError(
                    f"{where}: column {column!r} is both {roles[column]} and {role}; "
                    "a column is either kept, set, pseudonymised or faked"
                )
            roles[column] = role
    return TableEntry(
        key=key,
        schema=schema,
        table=table,
        keep=keep,
        set_values=tuple(set_values),
        pseudonymise=pseudonymise,
        structure_only=structure_only,
        note=note,
    )


def _columns(value: Any, where: str, name: str) -> tuple[str, ...]:
    label = f'"{name}"' if name else "the value"
    if not isinstance(value, list):
        raise ConfigError(f"{where}: {label} must be a list of column names, not {_kind(value)}")
    columns: list[str] = []
    for column in value:
        _column_name(column, where, name)
        if column in columns:
            raise ConfigError(f"{where}: column {column!r} is listed twice")
        columns.append(column)
    return tuple(columns)


def _column_name(column: Any, where: str, name: str) -> None:
    within = f' in "{name}"' if name else ""
    if not isinstance(column, str):
        raise ConfigError(f"{where}: column {column!r}{within} is {_kind(column)}, not a string")
    if not column or not _is_name(column):
        raise ConfigError(f"{where}: column {column!r}{within} is not a column name")


def _as_text(raw: Any) -> str | None:
    """JSON value -> the text the server casts: strings as written, JSON for the rest."""
    if raw is None:
        return None
    if isinstance(raw, str):
        return raw
    if isinstance(raw, bool):
        return "true" if raw else "false"
    return json.dumps(raw, ensure_ascii=False)


def schema() -> dict[str, Any]:
    """The JSON Schema of the allow list file, as shipped in the package."""
    text = resources.files("app").joinpath(SCHEMA_FILE).read_text(encoding="utf-8")
    document: dict[str, Any] = json.loads(text)
    return document


def check_schema(allow: AllowList) -> None:
    """Validate the file against the shipped JSON Schema; ConfigError lists what fails."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    validator = Draft202012Validator(schema())
    problems = []
    for error in validator.iter_errors(allow.document):
        deepest = best_match([error]) or error
        where = "/".join(str(p) for p in deepest.absolute_path) or "(top)"
        problems.append(f"{where}: {deepest.message}")
    if problems:
        raise ConfigError(
            f"allow list {allow.path} does not match {SCHEMA_FILE}: " + "; ".join(problems[:10])
        )


def _is_name(text: str) -> bool:
    """No NUL, and UTF-8 (JSON's \\ud800 escapes decode to lone surrogates, which no
    database name can hold and which psycopg cannot even send)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(f"key {key!r} appears twice")
        result[key] = value
    return result


def _kind(value: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }[type(value)]
