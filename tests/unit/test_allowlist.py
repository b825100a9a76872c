"""The allow list file: its format, and a clear exit 2 naming every problem (SPEC §3)."""

from __future__ import annotations

from pathlib import Path

import pytest

from app import allowlist
from app.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "allow_list.json"
    path.write_text(text, encoding="utf-8")
    return path


def test_keys_split_at_the_first_dot_and_default_to_public(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '{"users": ["id"], "billing.invoices": [], "public.a.b": ["x y", "Select"],'
        ' "Mixed Case": []}',
    )
    entries = allowlist.load(path).entries
    assert [(e.schema, e.table, e.keep) for e in entries] == [
        ("public", "users", ("id",)),
        ("billing", "invoices", ()),
        ("public", "a.b", ("x y", "Select")),
        ("public", "Mixed Case", ()),
    ]


def test_sha256_identifies_the_file(tmp_path: Path) -> None:
    first = allowlist.load(write(tmp_path, '{"users": ["id"]}')).sha256
    second = allowlist.load(write(tmp_path, '{"users": ["id", "email"]}')).sha256
    assert len(first) == 64 and first != second


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        ("   \n", "is empty"),
        ("{}", "lists no tables"),
        ("[]", "must be a JSON object"),
        ('{"users": ["id"]', "not valid JSON"),
        ('{"users": ["id"], "users": []}', "'users' appears twice"),
        ('{"users": ["id"], "public.users": []}', "names the same table"),
        ('{"users": "id"}', "must be a list of column names, not a string"),
        ('{"users": ["id", "id"]}', "'id' is listed twice"),
        ('{"users": ["id", 3]}', "column 3 is a number"),
        ('{"users": [null]}', "is null"),
        ('{"users": [""]}', "is not a column name"),
        ('{"": ["id"]}', "not a table name"),
        ('{".users": ["id"]}', "not a table name"),
        ('{"users": ["a\\u0000b"]}', "is not a column name"),
    ],
)
def test_bad_files_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        allowlist.load(path)
    assert str(path) in str(info.value)
    assert info.value.exit_code == 2


def test_missing_file_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ALLOW_LIST"):
        allowlist.load(tmp_path / "nope.json")


def test_binary_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "allow_list.json"
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ConfigError, match="not UTF-8"):
        allowlist.load(path)
