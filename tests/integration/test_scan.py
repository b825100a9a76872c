"""`scan` and SCAN: each kind of personal value in a kept column is caught, on the source,
in a dump, and by `dump` itself; the fixtures' faked columns never are."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from app.plan import MANIFEST_TABLE
from tests import jobrun
from tests.conftest import Server
from tests.jobrun import SCRATCH
from tests.seed import demo, pii
from tests.seed.jobserver import data as jobserver
from tests.seed.jobserver import scan_rate

EXPECTED = {column: kind for column, kind in pii.KINDS.items() if kind}


@dataclass
class Source:
    server: Server
    url: str
    root: Path

    def env(self, storage: Path, allow_list: Path | dict[str, Any], **extra: str) -> dict[str, str]:
        if isinstance(allow_list, dict):
            path = self.root / f"allow_list_{uuid.uuid4().hex[:6]}.json"
            path.write_text(json.dumps(allow_list), encoding="utf-8")
            allow_list = path
        return jobrun.job_env(
            self.url, storage, self.server.bindir, ALLOW_LIST=str(allow_list), **extra
        )


def _source(server: Server, factory: pytest.TempPathFactory, load: Any) -> Iterator[Source]:
    name = f"scan_{uuid.uuid4().hex[:8]}"
    url = server.create_database(name)
    with psycopg.connect(url) as conn:
        load(conn)
    yield Source(server, url, factory.mktemp(name))
    server.drop_database(name)


@pytest.fixture(scope="module")
def people(pg_server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Source]:
    yield from _source(pg_server, tmp_path_factory, pii.load)


def _findings(report: dict[str, Any]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for f in report["findings"]:
        found.setdefault(f["column"], set()).add(f["kind"])
    return found


def _assert_each_kind_caught(result: jobrun.Result, sampled: int) -> dict[str, Any]:
    assert result.returncode == 3, result.stderr
    report = json.loads(result.stdout)
    assert report["clean"] is False
    assert _findings(report) == {column: {kind} for column, kind in EXPECTED.items()}
    assert {f["count"] for f in report["findings"]} == {sampled}
    assert [c["column"] for c in report["free_text"]] == sorted(pii.FREE_TEXT)
    # The report shows redacted examples, never a value.
    for value in pii.row(1).values():
        if isinstance(value, str) and len(value) > 8:
            assert value not in result.stdout
    return report


@pytest.mark.one_major
def test_scan_of_the_source_catches_each_kind(people: Source, tmp_path: Path) -> None:
    env = people.env(tmp_path, pii.ALLOW_LIST)
    _assert_each_kind_caught(jobrun.run(env, "scan", "--format", "json"), pii.ROWS)
    bounded = _assert_each_kind_caught(
        jobrun.run(env, "scan", "--format", "json", "--rows", "5"), 5
    )
    assert bounded["rows_per_table"] == 5
    text = jobrun.run(env, "scan")
    assert text.returncode == 3
    assert "public.people.card: 20 of 20 values look like a payment card number, e.g. " in (
        text.stdout
    )
    assert "public.people.notes: 20 of 20 values are long text of many words" in text.stdout


@pytest.mark.one_major
def test_dump_warns_or_refuses_and_scan_reads_the_dump(people: Source, tmp_path: Path) -> None:
    env = people.env(tmp_path, pii.ALLOW_LIST)
    warned = jobrun.run(env, "dump")  # SCAN=warn is the default
    assert warned.returncode == 0, warned.stderr
    warnings = {
        line["column"]: line["kind"]
        for line in warned.logs
        if line["message"] == "kept column holds values that look personal"
    }
    assert warnings == EXPECTED
    dump = tmp_path / "sanitised.dump"
    published = hashlib.sha256(dump.read_bytes()).hexdigest()

    report = _assert_each_kind_caught(
        jobrun.run(env, "scan", "--dump", str(dump), "--format", "json"), pii.ROWS
    )
    assert {f["table"] for f in report["findings"]} == {"public.people"}  # the manifest's name

    refused = jobrun.run(dict(env, SCAN="fail"), "dump")
    assert refused.returncode == 3, refused.stderr
    assert "SCAN=fail: kept columns hold values that look personal" in refused.messages()
    assert "nothing published" in refused.messages()
    assert hashlib.sha256(dump.read_bytes()).hexdigest() == published
    assert jobrun.temp_files(tmp_path) == []
    assert SCRATCH not in jobrun.schemas(people.url)

    off = jobrun.run(dict(env, SCAN="off"), "dump")
    assert off.returncode == 0, off.stderr
    assert "scan done" not in off.messages()


@pytest.mark.one_major
def test_scan_of_a_missing_or_broken_dump_says_so(people: Source, tmp_path: Path) -> None:
    env = people.env(tmp_path, pii.ALLOW_LIST)
    missing = jobrun.run(env, "scan", "--dump", str(tmp_path / "nope.dump"))
    assert missing.returncode == 2
    assert "nope.dump: No such file or directory" in missing.messages()
    broken = tmp_path / "broken.dump"
    broken.write_bytes(b"PGDMP not really")
    result = jobrun.run(env, "scan", "--dump", str(broken))
    assert result.returncode == 2, result.stderr
    assert "broken.dump is not a sanitised dump: its header is damaged" in result.messages()


@pytest.fixture(scope="module")
def demo_source(pg_server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Source]:
    yield from _source(pg_server, tmp_path_factory, demo.load)


@pytest.mark.one_major
def test_demo_faked_columns_are_never_flagged(demo_source: Source, tmp_path: Path) -> None:
    env = demo_source.env(tmp_path, demo.ALLOW_LIST)
    assert jobrun.run(env, "dump").returncode == 0
    result = jobrun.run(env, "scan", "--dump", str(tmp_path / "sanitised.dump"), "--format", "json")
    assert result.returncode == 0, result.stdout
    report = json.loads(result.stdout)
    assert report["clean"] is True and report["columns"] > 40
    # ... and the scan would have flagged the originals of faked columns had they been kept.
    keep_all = {key: {"keep": []} for key in demo.allow_list()}
    with psycopg.connect(demo_source.url) as conn:
        for key in keep_all:
            schema, _, table = key.rpartition(".")
            columns = conn.execute(
                "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0"
                " AND NOT attisdropped AND attgenerated = ''",
                [f"{schema or 'public'}.{table}"],
            ).fetchall()
            keep_all[key] = {"keep": [c for (c,) in columns]}
    originals = json.loads(
        jobrun.run(demo_source.env(tmp_path, keep_all), "scan", "--format", "json").stdout
    )
    flagged = _findings(originals)
    assert flagged["password_hash"] == {"password_hash"} and flagged["api_token"] == {"token"}


@pytest.fixture(scope="module")
def jobserver_source(
    pg_server: Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Source]:
    yield from _source(pg_server, tmp_path_factory, jobserver.load)


@pytest.mark.one_major
def test_jobserver_faked_columns_are_never_flagged(
    jobserver_source: Source, tmp_path: Path
) -> None:
    env = jobserver_source.env(tmp_path, jobserver.ALLOW_LIST)
    assert jobrun.run(env, "dump").returncode == 0
    result = jobrun.run(env, "scan", "--dump", str(tmp_path / "sanitised.dump"), "--format", "json")
    report = json.loads(result.stdout)
    assert report["columns"] == 482  # every column of every table, faked ones too
    kept = {key: set(columns) for key, columns in jobserver.allow_list().items()}
    flagged = {(f["table"].split(".", 1)[1], f["column"]) for f in report["findings"]}
    assert all(column in kept[table] for table, column in flagged), flagged
    assert flagged == scan_rate.TRUE_POSITIVES


@pytest.mark.one_major
def test_false_positive_rate_on_the_jobserver_kept_columns(jobserver_source: Source) -> None:
    """The kept columns of the fixture hold no personal data; three hold random secrets."""
    rate = scan_rate.measure(jobserver_source.url, jobserver_source.server.bindir)
    print(f"\n{rate.describe()}")
    assert rate.flagged == scan_rate.TRUE_POSITIVES
    assert rate.false_positive_columns == 0
    assert rate.columns > 250


def test_reviewed_jobserver_allow_list_passes_scan_end_to_end(
    jobserver_source: Source, tmp_path: Path
) -> None:
    env = jobserver_source.env(tmp_path, scan_rate.REVIEWED, SCAN="fail")
    check = jobrun.run(env, "check", "--format", "json")
    assert check.returncode == 0, check.stderr
    structure_only = set(json.loads(check.stdout)["structure_only_tables"])
    assert structure_only == {"public.django_session"} | {
        f"public.social_auth_{t}"
        for t in ("association", "code", "nonce", "partial", "usersocialauth")
    }
    source_scan = jobrun.run(env, "scan")
    assert source_scan.returncode == 0, source_scan.stdout

    dumped = jobrun.run(env, "dump")
    assert dumped.returncode == 0, dumped.stderr
    dump = tmp_path / "sanitised.dump"
    assert jobrun.run(env, "scan", "--dump", str(dump)).returncode == 0

    server = jobserver_source.server
    target = server.create_database()
    try:
        restored = jobrun.restore(server.bindir, dump, target)
        assert restored.returncode == 0, restored.stderr
        categories = jobrun.rows(
            target, f'SELECT DISTINCT category FROM "{SCRATCH}".jobserver_project'
        )
        assert categories == [("unknown",)]
        for qualified in structure_only:
            table = qualified.split(".", 1)[1]
            assert jobrun.rows(target, f'SELECT count(*) FROM "{SCRATCH}".{table}') == [(0,)]
        tables = jobrun.rows(
            target,
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = %s"
            " AND table_name <> %s",
            [SCRATCH, MANIFEST_TABLE],
        )
        assert tables == [(jobserver.TABLE_COUNT,)]
    finally:
        server.drop_database(target.rsplit("/", 1)[1])


@pytest.mark.one_major
def test_scan_reads_a_partitioned_table_through_its_partitions(
    people: Source, tmp_path: Path
) -> None:
    with psycopg.connect(people.url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE public.events (id int, email text) PARTITION BY RANGE (id);"
            "CREATE TABLE public.events_1 PARTITION OF public.events FOR VALUES FROM (0) TO (100);"
            "INSERT INTO public.events SELECT i, 'e' || i || '@mailbox.co.uk'"
            " FROM generate_series(1, 5) i"
        )
    try:
        env = people.env(tmp_path, {"events": ["id", "email"]})
        result = jobrun.run(env, "scan", "--format", "json")
    finally:
        with psycopg.connect(people.url, autocommit=True) as conn:
            conn.execute("DROP TABLE public.events")
    assert result.returncode == 3, result.stderr
    (finding,) = json.loads(result.stdout)["findings"]
    assert (finding["table"], finding["column"], finding["count"]) == ("public.events", "email", 5)
