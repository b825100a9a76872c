"""The allow list's object form, end to end: set values, pseudonyms that still join,
structure-only tables, and every mistake stopped before anything is written."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from app import pseudonym
from app.plan import MANIFEST_TABLE
from app.scan import copy_blocks
from tests import jobrun
from tests.conftest import Server
from tests.jobrun import SCRATCH
from tests.seed import shop


@dataclass
class Shop:
    server: Server
    source: str
    storage: Path
    allow_list: Path


def _write(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def _env(shop_db: Shop, storage: Path, allow_list: Path, **extra: str) -> dict[str, str]:
    return jobrun.job_env(
        shop_db.source, storage, shop_db.server.bindir, ALLOW_LIST=str(allow_list), **extra
    )


@pytest.fixture(scope="module")
def shop_db(pg_server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    name = f"shop_{uuid.uuid4().hex[:8]}"
    source = pg_server.create_database(name)
    with psycopg.connect(source) as conn:
        shop.load(conn)
    root = tmp_path_factory.mktemp("shop")
    yield Shop(pg_server, source, root, _write(root / "allow_list.json", shop.ALLOW_LIST))
    pg_server.drop_database(name)


@dataclass
class Restored:
    url: str
    result: jobrun.Result
    script: str


@pytest.fixture(scope="module")
def restored(shop_db: Shop, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Restored]:
    storage = tmp_path_factory.mktemp("storage")
    result = jobrun.run(
        _env(shop_db, storage, shop_db.allow_list, PSEUDONYM_KEY=shop.KEY, SCAN="fail"), "dump"
    )
    assert result.returncode == 0, result.stderr
    name = f"restored_{uuid.uuid4().hex[:8]}"
    target = shop_db.server.create_database(name)
    dump = storage / "sanitised.dump"
    done = jobrun.restore(shop_db.server.bindir, dump, target)
    assert done.returncode == 0, done.stderr
    yield Restored(target, result, jobrun.restore_script(shop_db.server.bindir, dump))
    shop_db.server.drop_database(name)


def _by_id(url: str, schema: str, table: str, column: str) -> dict[int, Any]:
    query = f'SELECT id, {column}::text FROM "{schema}"."{table}" ORDER BY id'
    return dict(jobrun.rows(url, query))  # type: ignore[arg-type]


def test_set_values_replace_every_non_null_value(shop_db: Shop, restored: Restored) -> None:
    for column, expected in (
        ("tier", lambda n: "free"),
        ("referral", lambda n: f"ref-{n}"),
        ("contact", lambda n: f"c{n}@example.com"),
    ):
        source = _by_id(shop_db.source, "public", "customers", column)
        copied = _by_id(restored.url, SCRATCH, "customers", column)
        # Rows are numbered by primary key, and ids here run from 1.
        assert copied == {i: None if v is None else expected(i) for i, v in source.items()}
        assert None in copied.values(), f"{column}: the source has NULLs to keep"


def test_pseudonyms_are_the_keyed_hash_of_the_original(shop_db: Shop, restored: Restored) -> None:
    def digest(value: str) -> str:
        return pseudonym.reference(shop.KEY, value).hex()

    emails = _by_id(shop_db.source, "public", "customers", "email")
    assert _by_id(restored.url, SCRATCH, "customers", "email") == {
        i: f"{digest(e)[:16]}@pseudonym.invalid" for i, e in emails.items()
    }
    externals = _by_id(shop_db.source, "public", "customers", "external")
    assert _by_id(restored.url, SCRATCH, "customers", "external") == {
        i: str(uuid.UUID(digest(e)[:12] + "0" + digest(e)[13:32])) for i, e in externals.items()
    }
    assert "gmail.com" not in restored.script


def test_equal_originals_get_equal_pseudonyms_so_joins_and_their_foreign_key_hold(
    shop_db: Shop, restored: Restored
) -> None:
    join = (
        'SELECT o.id, c.id FROM "{s}".orders o JOIN "{s}".customers c'
        " ON c.email = o.customer_email ORDER BY 1"
    )
    source = jobrun.rows(shop_db.source, join.format(s="public"))
    assert len(source) > 40
    assert jobrun.rows(restored.url, join.format(s=SCRATCH)) == source
    externals = jobrun.rows(
        restored.url, f'SELECT count(DISTINCT external) FROM "{SCRATCH}".customers'
    )
    assert externals == [(10,)]  # 30 rows, 10 distinct originals
    foreign_keys = {
        name
        for (name,) in jobrun.rows(
            restored.url,
            "SELECT conname FROM pg_constraint"
            " WHERE contype = 'f' AND connamespace = %s::regnamespace",
            [SCRATCH],
        )
    }
    assert "orders_customer_email_fkey" in foreign_keys
    assert "orders_customer_id_fkey" in foreign_keys


def test_structure_only_table_has_its_structure_and_no_rows(restored: Restored) -> None:
    assert jobrun.rows(restored.url, f'SELECT count(*) FROM "{SCRATCH}".sessions') == [(0,)]
    assert "secret session data" not in restored.script
    indexes = jobrun.rows(
        restored.url, "SELECT indexname FROM pg_indexes WHERE tablename = 'sessions' ORDER BY 1"
    )
    assert indexes == [("sessions_customer",), ("sessions_pkey",)]
    constraints = {
        name: kind
        for name, kind in jobrun.rows(
            restored.url,
            "SELECT conname, contype FROM pg_constraint WHERE conrelid = %s::regclass",
            [f'"{SCRATCH}".sessions'],
        )
    }
    # Its own foreign key holds (no rows); the one pointing into it would not, so it is left out.
    assert constraints.get("sessions_customer_id_fkey") == "f"
    left_in_copy = jobrun.rows(
        restored.url,
        "SELECT count(*) FROM pg_constraint WHERE conname = 'orders_session_key_fkey'",
    )
    assert left_in_copy == [(0,)]
    left_out = [
        line
        for line in restored.result.logs
        if line["message"] == "foreign key left out"
        and "orders_session_key_fkey" in line["foreign_key"]
    ]
    assert left_out and "copied without rows" in left_out[0]["reason"]


def test_the_key_reaches_no_log(shop_db: Shop, restored: Restored) -> None:
    assert shop.KEY not in restored.result.stderr
    started = next(line for line in restored.result.logs if line["message"] == "run started")
    assert started["settings"]["pseudonym_key_set"] is True


@pytest.mark.one_major
def test_the_key_reaches_no_server_log_even_with_log_statement_all(
    shop_db: Shop, tmp_path: Path
) -> None:
    cluster = shop_db.server.cluster
    if cluster is None:
        pytest.skip("the server log of TEST_DATABASE_URL's server is not ours to read")
    database = shop_db.source.rsplit("/", 1)[1]
    with psycopg.connect(shop_db.server.admin_url, autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE \"{database}\" SET log_statement = 'all'")
    try:
        before = cluster.logfile.stat().st_size
        result = jobrun.run(
            _env(shop_db, tmp_path, shop_db.allow_list, PSEUDONYM_KEY=shop.KEY), "dump"
        )
        assert result.returncode == 0, result.stderr
        with cluster.logfile.open("rb") as log:
            log.seek(before)
            server_log = log.read().decode(errors="replace")
    finally:
        with psycopg.connect(shop_db.server.admin_url, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{database}" RESET log_statement')
    assert "sanitised_dump_pseudonym_key" in server_log  # the statements were logged
    inner, outer = pseudonym.pads(shop.KEY)
    for secret in (shop.KEY, inner.hex(), outer.hex(), shop.KEY.encode().hex()):
        assert secret not in server_log


def _data(script: str) -> dict[tuple[str, str], list[list[str | None]]]:
    """The rows of every copied table (the manifest, which says when it was made, aside)."""
    return {
        table: list(rows)
        for table, _, rows in copy_blocks(script.splitlines())
        if table[1] != MANIFEST_TABLE
    }


@pytest.mark.one_major
def test_pseudonyms_are_the_same_every_run_with_the_key_and_change_with_it(
    shop_db: Shop, restored: Restored, tmp_path: Path
) -> None:
    runs = {}
    for name, key in (("same", shop.KEY), ("other", "another-key-of-enough-length")):
        storage = tmp_path / name
        storage.mkdir()
        result = jobrun.run(_env(shop_db, storage, shop_db.allow_list, PSEUDONYM_KEY=key), "dump")
        assert result.returncode == 0, result.stderr
        runs[name] = _data(jobrun.restore_script(shop_db.server.bindir, storage / "sanitised.dump"))
    first = _data(restored.script)
    assert runs["same"] == first
    emails = {row[1] for row in first[SCRATCH, "customers"]}
    other = {row[1] for row in runs["other"][SCRATCH, "customers"]}
    assert len(emails) == len(other) == 30 and not emails & other


def _mistake(shop_db: Shop, tmp_path: Path, change: dict[str, Any], **env: str) -> jobrun.Result:
    document = json.loads(json.dumps(shop.ALLOW_LIST))
    for key, value in change.items():
        document[key] = value
    allow_list = _write(tmp_path / "allow_list.json", document)
    env.setdefault("PSEUDONYM_KEY", shop.KEY)
    result = jobrun.run(_env(shop_db, tmp_path, allow_list, **env), "dump")
    assert not (tmp_path / "sanitised.dump").exists()
    assert jobrun.temp_files(tmp_path) == []
    assert SCRATCH not in jobrun.schemas(shop_db.source)
    return result


_CUSTOMERS = shop.ALLOW_LIST["customers"]


@pytest.mark.one_major
@pytest.mark.parametrize(
    ("change", "code", "message"),
    [
        pytest.param(
            {"keep": ["id", "name"], "set": {"points": "lots"}},
            3,
            'public.customers.points: "lots" does not fit (invalid input syntax for type bigint',
            id="bad-type",
        ),
        pytest.param(
            {"set": {"tier": "gold"}},
            3,
            "public.customers.tier: the set value is rejected by customers_tier_check",
            id="column-check",
        ),
        pytest.param(
            {"set": {"referral": "same"}},
            3,
            "column public.customers.referral (entry 'customers') is unique",
            id="constant-on-unique",
        ),
        pytest.param(
            {"set": {"nickname": "x"}},
            3,
            "column 'nickname' of table 'public.customers' (entry 'customers', set) does not exist",
            id="missing-column",
        ),
        pytest.param(
            {"keep": ["id", "points"], "set": {"name": None}},
            3,
            "column public.customers.name (entry 'customers') is NOT NULL",
            id="null-on-not-null",
        ),
        pytest.param(
            {"sets": {"tier": "free"}},
            2,
            "entry 'customers': unknown key 'sets' (did you mean 'set'?)",
            id="unknown-key",
        ),
        pytest.param(
            {"keep": ["id", "name"], "set": {"name": "x"}},
            2,
            "entry 'customers': column 'name' is both kept and set",
            id="kept-and-set",
        ),
    ],
)
def test_mistakes_stop_the_run_before_any_write(
    shop_db: Shop, tmp_path: Path, change: dict[str, Any], code: int, message: str
) -> None:
    customers = dict(_CUSTOMERS, set={})
    customers.update(change)
    result = _mistake(shop_db, tmp_path, {"customers": customers})
    assert result.returncode == code, result.stderr
    assert message in result.messages()
    assert "table copied" not in result.messages()


@pytest.mark.one_major
def test_a_check_on_a_set_and_a_faked_column_stops_the_copy_naming_it(
    shop_db: Shop, tmp_path: Path
) -> None:
    with psycopg.connect(shop_db.source, autocommit=True) as conn:
        conn.execute(
            "ALTER TABLE customers ADD CONSTRAINT tier_matches_name"
            " CHECK (tier IS NULL OR name LIKE 'Customer%')"
        )
    try:
        customers = dict(_CUSTOMERS, keep=["id", "points"])  # name is faked: name_1, ...
        result = _mistake(shop_db, tmp_path, {"customers": customers})
    finally:
        with psycopg.connect(shop_db.source, autocommit=True) as conn:
            conn.execute("ALTER TABLE customers DROP CONSTRAINT tier_matches_name")
    assert result.returncode == 3, result.stderr
    assert "tier_matches_name rejects a fake or set value" in result.messages()


@pytest.mark.one_major
@pytest.mark.parametrize(
    ("key", "message"),
    [
        (None, "pseudonymises columns (public.customers.email"),
        ("tiny-key-9", "PSEUDONYM_KEY must be at least 16 bytes"),
    ],
)
def test_pseudonymise_needs_a_long_key(
    shop_db: Shop, tmp_path: Path, key: str | None, message: str
) -> None:
    env = {"PSEUDONYM_KEY": key} if key else {"PSEUDONYM_KEY": ""}
    result = _mistake(shop_db, tmp_path, {}, **env)
    assert result.returncode == 2, result.stderr
    assert message in result.messages()
    if key:
        assert key not in result.stderr.replace(message, "")


@pytest.mark.one_major
def test_pseudonymise_refuses_a_type_it_cannot_fit(shop_db: Shop, tmp_path: Path) -> None:
    with psycopg.connect(shop_db.source, autocommit=True) as conn:
        conn.execute("ALTER TABLE customers ADD COLUMN seen timestamptz")
    try:
        customers = dict(_CUSTOMERS, pseudonymise=["email", "seen"])
        result = _mistake(shop_db, tmp_path, {"customers": customers})
    finally:
        with psycopg.connect(shop_db.source, autocommit=True) as conn:
            conn.execute("ALTER TABLE customers DROP COLUMN seen")
    assert result.returncode == 3, result.stderr
    assert "public.customers.seen of type timestamp with time zone is pseudonymised but type" in (
        result.messages()
    )


@pytest.mark.one_major
def test_check_and_plan_show_the_reviewer_everything(shop_db: Shop, tmp_path: Path) -> None:
    env = _env(shop_db, tmp_path, shop_db.allow_list)  # no key needed to look
    check = jobrun.run(env, "check", "--format", "json")
    assert check.returncode == 0, check.stderr
    report = json.loads(check.stdout)
    tables = {t["table"]: t for t in report["tables"]}
    assert tables["public.customers"]["set"] == _CUSTOMERS["set"]
    assert tables["public.customers"]["pseudonymised"] == ["email", "external"]
    assert tables["public.customers"]["note"] == _CUSTOMERS["note"]
    assert tables["public.sessions"]["structure_only"] is True
    assert report["structure_only_tables"] == ["public.sessions"]
    assert report["pseudonym_key_needed"] is True
    assert {
        "foreign_key": "public.orders.orders_session_key_fkey -> public.sessions",
        "reason": "it points to public.sessions, which is copied without rows",
    } in report["foreign_keys_left_out"]
    text = jobrun.run(env, "check").stdout
    assert 'set: referral = "ref-{n}"' in text
    assert "public.sessions: structure only (no rows)" in text
    assert "note: session keys are credentials" in text

    plan = jobrun.run(env, "plan").stdout
    assert "public.sessions -> sessions (structure only, no rows)" in plan
    assert 'tier text: set to "free"' in plan
    assert "email text: pseudonym:" in plan and "sanitised_dump_pseudonym_key" in plan


def test_the_manifest_records_the_reviewers_choices(shop_db: Shop, restored: Restored) -> None:
    published = next(line for line in restored.result.logs if line["message"] == "published")
    env = _env(shop_db, Path(published["path"]).parent, shop_db.allow_list)
    shown = jobrun.run(env, "inspect", published["path"], "--format", "json")
    assert shown.returncode == 0, shown.stderr
    tables = {t["name"]: t for t in json.loads(shown.stdout)["manifest"]["tables"]}
    customers = tables["customers"]
    assert customers["set"] == _CUSTOMERS["set"]
    assert customers["pseudonymised"] == ["email", "external"]
    assert customers["note"] == _CUSTOMERS["note"]
    assert customers["faked"] == [] and customers["structure_only"] is False
    assert tables["sessions"]["structure_only"] is True
    assert tables["sessions"]["rows"] == 0
    text = jobrun.run(env, "inspect", published["path"]).stdout
    assert 'set:   referral = "ref-{n}"' in text
    assert "pseudonymised: email, external" in text
    assert "structure only: no rows" in text
