"""The schema this job was first written for: 54 tables, its real allow list, every major."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest

from tests import jobrun
from tests.conftest import Server
from tests.jobrun import SCRATCH
from tests.seed.jobserver import data

FK_QUERY = """
SELECT count(*) FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
WHERE n.nspname = %s AND c.contype = 'f'
"""


def test_jobserver_dump_restores_without_a_canary(
    pg_server: Server, source_db: str, target_db: str, tmp_path: Path
) -> None:
    with psycopg.connect(source_db) as conn:
        data.load(conn)
    env = jobrun.job_env(source_db, tmp_path, pg_server.bindir, ALLOW_LIST=str(data.ALLOW_LIST))
    result = jobrun.run(env, "dump")
    assert result.returncode == 0, result.stderr
    dump = tmp_path / "sanitised.dump"
    restored = jobrun.restore(pg_server.bindir, dump, target_db)
    assert restored.returncode == 0, restored.stderr
    assert data.CANARY not in jobrun.restore_script(pg_server.bindir, dump).lower()

    copied = [line for line in result.logs if line["message"] == "table copied"]
    assert len(copied) == data.TABLE_COUNT
    assert all(line["rows"] == 20 for line in copied)
    faked = {(line["table"], c) for line in copied for c in line["faked"]}
    assert ("public.jobserver_project", "category") in faked
    assert len(faked) == 19

    left_out = [line for line in result.logs if line["message"] == "foreign key left out"]
    source_fks = jobrun.rows(source_db, FK_QUERY, ["public"])[0][0]
    assert jobrun.rows(target_db, FK_QUERY, [SCRATCH])[0][0] == source_fks - len(left_out)
    assert source_fks >= 100


@pytest.mark.one_major
def test_check_reports_the_drift_and_the_columns_to_review(
    pg_server: Server, source_db: str, tmp_path: Path
) -> None:
    with psycopg.connect(source_db) as conn:
        data.load(conn, rows=3)
    env = jobrun.job_env(source_db, tmp_path, pg_server.bindir, ALLOW_LIST=str(data.ALLOW_LIST))
    result = jobrun.run(env, "check", "--format", "json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    tables = {t["table"]: t for t in report["tables"]}
    assert len(tables) == data.TABLE_COUNT
    project = tables["public.jobserver_project"]
    assert "category" in [f["column"] for f in project["faked"]]
    assert "fullname" in tables["public.jobserver_user"]["sensitive_kept"]
    assert report["unlisted_tables"] == []
    text = jobrun.run(env, "check")
    assert text.returncode == 0
    assert "public.jobserver_project: " in text.stdout
    plan = jobrun.run(env, "plan", "--format", "json")
    assert plan.returncode == 0, plan.stderr
    columns = {
        c["column"]: c
        for t in json.loads(plan.stdout)["tables"]
        if t["table"] == "public.jobserver_project"
        for c in t["columns"]
    }
    assert columns["category"]["action"] == "faked"
    assert "'category_'" in columns["category"]["fake"]
    assert columns["id"]["action"] == "kept"
