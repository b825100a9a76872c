"""pg_dump's connection: the password only in its environment, and a session that notices
when pg_dump dies."""

from __future__ import annotations

import pytest
from psycopg.conninfo import conninfo_to_dict

from app.dump import child_env

CHECK = "-c client_connection_check_interval=1s"


def test_password_moves_from_the_url_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGOPTIONS", raising=False)
    dbname, env = child_env("postgresql://dumper:s3cret@db.example:5433/prod", "sanitised-dump")
    assert dbname is not None and "s3cret" not in dbname
    assert env["PGPASSWORD"] == "s3cret"
    params = conninfo_to_dict(dbname)
    assert (params["host"], params["port"], params["dbname"]) == ("db.example", "5433", "prod")


def test_the_check_interval_joins_options_of_the_url_and_of_pgoptions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PGOPTIONS", "-c work_mem=64MB")
    dbname, env = child_env("host=db options='-c search_path=app'", "sanitised-dump")
    assert dbname is not None
    assert conninfo_to_dict(dbname)["options"] == f"-c search_path=app {CHECK}"
    assert env["PGOPTIONS"] == f"-c work_mem=64MB {CHECK}"


def test_without_database_url_libpq_reads_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PGOPTIONS", raising=False)
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:p@h/d")
    dbname, env = child_env(None, "sanitised-dump")
    assert dbname is None
    assert "DATABASE_URL" not in env and env["PGOPTIONS"] == CHECK
