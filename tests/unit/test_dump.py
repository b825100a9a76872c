"""pg_dump's connection: the password only in its environment, and a session that notices
when pg_dump dies; its compression: the default for each pg_dump, and what older ones cannot
do."""

from __future__ import annotations

import pytest
from psycopg.conninfo import conninfo_to_dict

from app import dump
from app.dump import child_env
from app.errors import PgDumpError

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


def _pg_dump(major: int) -> dump.PgDump:
    return dump.PgDump(path=f"/usr/lib/postgresql/{major}/bin/pg_dump", major=major, version="")


def test_default_is_zstd_where_pg_dump_has_it_and_gzip_before() -> None:
    assert dump.compression(None, _pg_dump(16)) == "zstd:1"
    assert dump.compression(None, _pg_dump(15)) == "gzip:1"
    assert dump.compression("gzip:6", _pg_dump(18)) == "gzip:6"


@pytest.mark.parametrize("setting", ["zstd", "lz4:3"])
def test_lz4_and_zstd_with_an_old_pg_dump_stop_the_run_naming_the_setting(setting: str) -> None:
    with pytest.raises(PgDumpError, match="DUMP_COMPRESSION") as info:
        dump.compression(setting, _pg_dump(15))
    assert info.value.exit_code == 5


@pytest.mark.parametrize(
    ("value", "major", "flags"),
    [
        ("zstd:1", 16, ["--compress=zstd:1"]),
        ("none", 17, ["--compress=none"]),
        ("gzip:1", 14, ["--compress=1"]),
        ("gzip", 14, []),
        ("none", 15, ["--compress=0"]),
    ],
)
def test_flags_fit_the_pg_dump(value: str, major: int, flags: list[str]) -> None:
    assert dump.compress_flags(value, major) == flags
