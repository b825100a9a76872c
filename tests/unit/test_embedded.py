"""Where the embedded scratch server's binaries come from."""

from __future__ import annotations

from pathlib import Path

import pytest

from app import config
from app.embedded import find_bindir
from app.errors import ConfigError


def test_pg_bindir_without_a_server_is_refused_naming_the_variable(tmp_path: Path) -> None:
    (tmp_path / "initdb").touch(mode=0o755)
    settings = config.load({"SCRATCH_DATABASE_URL": "embedded", "PG_BINDIR": str(tmp_path)})
    with pytest.raises(ConfigError, match="PG_BINDIR") as raised:
        find_bindir(settings)
    assert raised.value.exit_code == 2


def test_the_server_beside_pg_dump_is_used_so_that_their_majors_match(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for program in ("initdb", "pg_ctl", "postgres", "pg_dump"):
        (bindir / program).touch(mode=0o755)
    settings = config.load({"SCRATCH_DATABASE_URL": "embedded", "PG_DUMP": str(bindir / "pg_dump")})
    assert find_bindir(settings) == bindir
    explicit = config.load({"SCRATCH_DATABASE_URL": "embedded", "PG_BINDIR": str(bindir)})
    assert find_bindir(explicit) == bindir
