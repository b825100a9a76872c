"""`inspect` and the pg_restore check: dumps of another major, files that are not ours."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from app.cluster import Cluster, pick_free_port
from tests import jobrun, pgbin
from tests.conftest import Server
from tests.seed import demo

OLDEST = 14

pytestmark = pytest.mark.one_major


@pytest.fixture(scope="module")
def old_server() -> Iterator[Cluster]:
    """A server of the oldest supported major, beside the newest one of the run."""
    root = Path(tempfile.mkdtemp(prefix="sdump-old-"))
    try:
        with Cluster(pgbin.bindir(OLDEST), root / f"pg{OLDEST}", pick_free_port()) as cluster:
            yield cluster
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.throwaway_clusters
def test_a_dump_made_by_an_older_pg_dump_is_inspected_and_restored(
    pg_server: Server, old_server: Cluster, target_db: str, tmp_path: Path
) -> None:
    """The developer's pg_restore (the newest) reads a dump that pg_dump 14 wrote."""
    with psycopg.connect(old_server.url(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE demo TEMPLATE template0")
    with psycopg.connect(old_server.url("demo")) as conn:
        demo.load(conn)
    env = jobrun.job_env(
        old_server.url("demo"),
        tmp_path,
        old_server.bindir,  # pg_dump 14
        PG_RESTORE=str(pg_server.bindir / "pg_restore"),
    )
    assert jobrun.run(env, "dump").returncode == 0

    shown = jobrun.run(env, "inspect", "--format", "json")
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert report["archive"]["pg_dump_version"].startswith(f"{OLDEST}.")
    assert report["archive"]["needs_pg_restore"] == OLDEST
    assert report["manifest"]["source"]["server_version"].startswith(f"{OLDEST}.")
    rows = {f"{t['schema']}.{t['name']}": t["rows"] for t in report["manifest"]["tables"]}
    assert rows == {k: v for k, v in demo.TABLES.items() if k not in demo.UNLISTED}

    restored = jobrun.run(env, "restore", "--target", target_db)
    assert restored.returncode == 0, restored.stderr
    assert jobrun.rows(target_db, "SELECT count(*) FROM billing.invoices") == [
        (demo.TABLES["billing.invoices"],)
    ]


@pytest.fixture(scope="module")
def newest_dump(pg_server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    storage = tmp_path_factory.mktemp("storage")
    url = pg_server.create_database()
    try:
        with psycopg.connect(url) as conn:
            demo.load(conn)
        assert jobrun.run(jobrun.job_env(url, storage, pg_server.bindir), "dump").returncode == 0
        yield storage / "sanitised.dump"
    finally:
        pg_server.drop_database(url.rsplit("/", 1)[1])


@pytest.mark.throwaway_clusters
def test_a_pg_restore_older_than_the_dump_is_refused_naming_the_one_needed(
    pg_server: Server, newest_dump: Path, target_db: str, tmp_path: Path
) -> None:
    if pg_server.major == OLDEST:
        pytest.skip(f"needs a server newer than {OLDEST}")
    env = jobrun.job_env(
        target_db, tmp_path, pg_server.bindir, PG_RESTORE=str(pgbin.bindir(OLDEST) / "pg_restore")
    )
    restore = ["restore", "--dump", str(newest_dump), "--target", target_db]
    for args in (["inspect", str(newest_dump)], restore):
        refused = jobrun.run(env, *args)
        assert refused.returncode == 5, refused.stderr
        message = refused.messages()
        assert f"pg_restore {OLDEST} (" in message
        assert f"use pg_restore {pg_server.major} or newer" in message
    assert jobrun.schemas(target_db) & {"billing", "temp_scrubbed_schema"} == set()


def test_files_that_are_not_sanitised_dumps_are_refused_clearly(
    pg_server: Server, newest_dump: Path, source_db: str, tmp_path: Path
) -> None:
    with psycopg.connect(source_db) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)")
    plain, archive, tar = tmp_path / "plain.sql", tmp_path / "other.dump", tmp_path / "other.tar"
    for fmt, path in (("plain", plain), ("custom", archive), ("tar", tar)):
        subprocess.run(
            [pg_server.bindir / "pg_dump", f"--format={fmt}", f"--file={path}", source_db],
            check=True,
        )
    (tmp_path / "notes.txt").write_text("not a dump\n")
    truncated = tmp_path / "truncated.dump"
    truncated.write_bytes(newest_dump.read_bytes()[:12])
    expected = {
        tmp_path / "notes.txt": "is not a sanitised dump: it is no pg_dump archive",
        plain: "is a plain SQL script, not a sanitised dump",
        archive: "is a pg_dump archive but not a sanitised dump: it carries no manifest",
        tar: "is a pg_dump archive but not a sanitised dump: it carries no manifest",
        truncated: "is not a sanitised dump: its header is damaged",
        tmp_path / "missing.dump": "cannot read the dump",
    }
    env = jobrun.job_env(source_db, tmp_path, pg_server.bindir)
    runs = [(["inspect", str(path)], message) for path, message in expected.items()]
    # restore reads the dump the same way, before it connects to anything
    runs.append((["restore", "--dump", str(archive), "--target", source_db], expected[archive]))
    for args, message in runs:
        refused = jobrun.run(env, *args)
        assert refused.returncode == 2, (args, refused.stderr)
        assert message in refused.messages(), (args, refused.stderr)
        assert refused.stdout == ""
