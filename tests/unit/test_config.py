"""Configuration from the environment: defaults, and errors that name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from app import config
from app.errors import ConfigError


def test_defaults_match_the_contract() -> None:
    c = config.load({})
    assert c.database_url is None
    assert c.storage_dir == Path("/storage")
    assert c.dump_name == "sanitised.dump"
    assert c.scratch_schema == "temp_scrubbed_schema"
    assert c.log_format == "json" and c.log_level == "INFO"
    assert c.pg_dump == "pg_dump"
    assert c.allow_list.name == "allow_list.json" and c.allow_list.is_file()
    assert c.max_scratch_bytes is None
    assert c.dump_path == Path("/storage/sanitised.dump")


def test_settings_are_read() -> None:
    c = config.load(
        {
            "DATABASE_URL": "postgresql://u:secret@db/app",
            "STORAGE_DIR": "/data",
            "DUMP_NAME": "dev.dump",
            "SCRATCH_SCHEMA": "Scratch Space",
            "LOG_FORMAT": "text",
            "LOG_LEVEL": "debug",
            "LOCK_TIMEOUT": "500ms",
            "MAX_SCRATCH_BYTES": "2GiB",
            "CONNECT_ATTEMPTS": "3",
        }
    )
    assert c.dump_path == Path("/data/dev.dump")
    assert c.scratch_schema == "Scratch Space"
    assert c.log_level == "DEBUG"
    assert c.max_scratch_bytes == 2 * 1024**3
    assert c.connect_attempts == 3
    assert "secret" not in str(c.describe())


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LOG_FORMAT", "xml"),
        ("LOG_LEVEL", "LOUD"),
        ("DUMP_NAME", "../escape.dump"),
        ("DUMP_NAME", "tmp-sanitised-dump-x"),
        ("SCRATCH_SCHEMA", "public"),
        ("SCRATCH_SCHEMA", "pg_temp"),
        ("SCRATCH_SCHEMA", "x" * 64),
        ("LOCK_TIMEOUT", "soon"),
        ("MAX_SCRATCH_BYTES", "lots"),
        ("CONNECT_ATTEMPTS", "0"),
        ("CONNECT_WAIT", "-1"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name) as info:
        config.load({name: value})
    assert info.value.exit_code == 2
