"""The allow list file: its format, a clear exit 2 naming every problem (SPEC §3), the
object form parsed strictly, and the shipped JSON Schema agreeing with the parser."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from app import allowlist
from app.allowlist import AllowList, SetValue, TableEntry, parse
from app.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


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


def test_list_form_keeps_its_meaning() -> None:
    (entry,) = parse({"billing.invoices": ["id", "amount"]})
    assert entry == TableEntry("billing.invoices", "billing", "invoices", ("id", "amount"))
    assert not entry.structure_only and entry.set_values == () and entry.pseudonymise == ()


def test_object_form_reads_every_key() -> None:
    (project, session) = parse(
        {
            "jobserver_project": {
                "keep": ["id", "name"],
                "set": {"category": "unknown", "email": "user{n}@example.com", "n": 3},
                "pseudonymise": ["owner_email"],
                "note": "reviewed by A. N. Other, 2026-01-12",
            },
            "django_session": {"rows": "none", "note": "credentials"},
        }
    )
    assert project.keep == ("id", "name")
    assert project.pseudonymise == ("owner_email",)
    assert project.note == "reviewed by A. N. Other, 2026-01-12"
    assert project.set_value("category") == SetValue("unknown", "unknown")
    email = project.set_value("email")
    assert email is not None and email.numbered and email.sample(7) == "user7@example.com"
    assert project.set_value("n") == SetValue(3, "3")
    assert project.named_columns == ("id", "name", "category", "email", "n", "owner_email")
    assert session.structure_only and session.keep == () and session.note == "credentials"


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        ("x", "x"),
        (True, "true"),
        (False, "false"),
        (42, "42"),
        (1.5, "1.5"),
        (None, None),
        ({"a": [1, "é"]}, '{"a": [1, "é"]}'),
        (["x"], '["x"]'),
    ],
)
def test_set_values_become_the_text_the_server_casts(raw: Any, text: str | None) -> None:
    (entry,) = parse({"t": {"set": {"c": raw}}})
    value = entry.set_value("c")
    assert value is not None and value.raw == raw and value.text == text
    assert not value.numbered


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"kep": ["id"]}, "unknown key 'kep' (did you mean 'keep'?)"),
        ({"pseudonymize": ["id"]}, "unknown key 'pseudonymize' (did you mean 'pseudonymise'?)"),
        ({"keep": ["id"], "set": {"id": 1}}, "column 'id' is both kept and set"),
        ({"keep": ["id"], "pseudonymise": ["id"]}, "column 'id' is both kept and pseudonymised"),
        ({"set": {"e": "x"}, "pseudonymise": ["e"]}, "column 'e' is both set and pseudonymised"),
        ({"set": ["category"]}, '"set" must be an object of column -> value, not a list'),
        ({"set": {"": 1}}, "column '' in \"set\" is not a column name"),
        ({"rows": "all"}, '"rows" can only be "none"'),
        ({"rows": None}, '"rows" can only be "none"'),
        ({"rows": "none", "keep": []}, '"rows": "none" copies no rows, so "keep"'),
        ({"rows": "none", "set": {"a": 1}}, '"rows": "none" copies no rows, so "set"'),
        ({"note": 3}, '"note" must be a string, not a number'),
        ({"keep": "id"}, '"keep" must be a list of column names, not a string'),
        ({"keep": ["id", "id"]}, "column 'id' is listed twice"),
        ({"pseudonymise": [1]}, 'column 1 in "pseudonymise" is a number, not a string'),
    ],
)
def test_object_form_mistakes_exit_2_naming_the_entry(value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse({"orders": value}, "list.json")
    assert caught.value.exit_code == 2
    assert "allow list list.json, entry 'orders'" in str(caught.value)
    assert message in str(caught.value)


def test_a_value_that_is_neither_list_nor_object_names_both_forms() -> None:
    with pytest.raises(
        ConfigError, match=r"list of column names, not a string \(or an object with keep, set"
    ):
        parse({"orders": "id"})


def test_schema_key_is_for_editors_and_ignored() -> None:
    entries = parse({"$schema": "./app/allow_list.schema.json", "orders": ["id"]})
    assert [e.key for e in entries] == ["orders"]
    with pytest.raises(ConfigError, match="lists no tables"):
        parse({"$schema": "x"})
    with pytest.raises(ConfigError, match='"\\$schema" must be a string'):
        parse({"$schema": 1, "orders": []})


def test_shipped_schema_is_valid_and_installed_with_the_package() -> None:
    schema = allowlist.schema()
    Draft202012Validator.check_schema(schema)
    assert schema == json.loads((REPO / "app" / "allow_list.schema.json").read_text())


@pytest.mark.parametrize(
    "path",
    [
        REPO / "allow_list.json",
        REPO / "tests/seed/jobserver/allow_list.json",
        REPO / "tests/seed/jobserver/allow_list.reviewed.json",
    ],
    ids=lambda p: str(p.relative_to(REPO)),
)
def test_shipped_allow_lists_match_the_schema(path: Path) -> None:
    allowlist.check_schema(allowlist.load(path))


def test_check_schema_names_the_failing_place() -> None:
    bad = AllowList(Path("x.json"), (), "", {"orders": {"rows": "some"}})
    with pytest.raises(ConfigError, match=r"x.json does not match allow_list.schema.json: orders"):
        allowlist.check_schema(bad)


# Documents near the format's edges: the parser and the schema must agree on them.
_names = st.sampled_from(["id", "email", "", "a.b", 1, None])
_columns = st.lists(_names, max_size=3)
_json = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5), st.just({}))
_table = st.one_of(
    _columns,
    st.dictionaries(
        st.sampled_from(["keep", "set", "rows", "note", "pseudonymise", "kep"]),
        st.one_of(
            _columns,
            st.dictionaries(st.sampled_from(["email", "n", ""]), _json, max_size=2),
            st.sampled_from(["none", "all", None, 3]),
            st.text(max_size=4),
        ),
        max_size=3,
    ),
    st.text(max_size=3),
    st.none(),
)
_documents = st.dictionaries(
    st.sampled_from(["orders", "billing.invoices", ".x", "x.", "$schema", "a..b"]),
    _table,
    max_size=3,
)
# What only the parser can see: a column named twice across keep, set and pseudonymise.
_PARSER_ONLY = ("is both",)


@settings(max_examples=400, deadline=None)
@given(_documents)
def test_parser_and_schema_agree(document: dict[str, Any]) -> None:
    validator = Draft202012Validator(allowlist.schema())
    schema_ok = validator.is_valid(document)
    try:
        parse(document)
    except ConfigError as exc:
        assert not schema_ok or any(s in str(exc) for s in _PARSER_ONLY), (document, exc)
    else:
        assert schema_ok, document
