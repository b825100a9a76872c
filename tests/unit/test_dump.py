"""pg_dump's compression: the default for each pg_dump, and what older ones cannot do."""

from __future__ import annotations

import pytest

from app import dump
from app.errors import PgDumpError


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
