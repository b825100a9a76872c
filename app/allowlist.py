"""The allow list: table -> columns safe to keep verbatim (SPEC §3).

Only the file is checked here; whether the names exist is the catalog's business.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.errors import ConfigError


@dataclass(frozen=True)
class TableEntry:
    """One allow list entry: a table and the columns kept verbatim."""

    key: str
    schema: str
    table: str
    keep: tuple[str, ...]

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.table}"


@dataclass(frozen=True)
class AllowList:
    path: Path
    entries: tuple[TableEntry, ...]
    sha256: str


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
    return AllowList(path=path, entries=entries, sha256=hashlib.sha256(raw).hexdigest())


def parse(document: Any, path: Path | str = "allow list") -> tuple[TableEntry, ...]:
    if not isinstance(document, dict):
        raise ConfigError(
            f"allow list {path} must be a JSON object of table -> list of columns, "
            f"not a {type(document).__name__}"
        )
    if not document:
        raise ConfigError(f"allow list {path} lists no tables")
    entries: list[TableEntry] = []
    seen: dict[tuple[str, str], str] = {}
    for key, value in document.items():
        where = f"allow list {path}, entry {key!r}"
        schema, table = split_key(key)
        if not schema or not table or not _is_name(key):
            raise ConfigError(f'{where}: not a table name (use "table" or "schema.table")')
        if (schema, table) in seen:
            raise ConfigError(f"{where}: names the same table as entry {seen[schema, table]!r}")
        seen[schema, table] = key
        if not isinstance(value, list):
            raise ConfigError(
                f"{where}: the value must be a list of column names, not {_kind(value)}"
            )
        columns: list[str] = []
        for column in value:
            if not isinstance(column, str):
                raise ConfigError(f"{where}: column {column!r} is {_kind(column)}, not a string")
            if not column or not _is_name(column):
                raise ConfigError(f"{where}: column {column!r} is not a column name")
            if column in columns:
                raise ConfigError(f"{where}: column {column!r} is listed twice")
            columns.append(column)
        entries.append(TableEntry(key=key, schema=schema, table=table, keep=tuple(columns)))
    return tuple(entries)


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
