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
    assert c.copy_connections == 2
    assert c.scratch_unlogged is True
    assert config.load({"SCRATCH_UNLOGGED": "off"}).scratch_unlogged is False
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
        ("COPY_CONNECTIONS", "0"),
        ("COPY_CONNECTIONS", "17"),
        ("COPY_CONNECTIONS", "two"),
        ("SCRATCH_UNLOGGED", "maybe"),
        ("DUMP_COMPRESSION", "brotli"),
        ("DUMP_COMPRESSION", "zstd:99"),
        ("DUMP_COMPRESSION", "gzip:fast"),
        ("DUMP_COMPRESSION", "none:1"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name) as info:
        config.load({name: value})
    assert info.value.exit_code == 2


@pytest.mark.parametrize(
    ("value", "mode"),
    [
        (None, "schema"),
        ("  ", "schema"),
        ("embedded", "embedded"),
        ("EMBEDDED", "embedded"),
        ("postgresql://scrub:pw@scratch-db/scratch", "database"),
        ("host=scratch-db dbname=scratch", "database"),
    ],
)
def test_scratch_database_url_picks_the_mode(value: str | None, mode: str) -> None:
    c = config.load({} if value is None else {"SCRATCH_DATABASE_URL": value})
    assert c.mode == mode
    assert c.describe()["mode"] == mode
    assert "pw" not in str(c.describe())


def test_a_scratch_database_url_that_libpq_cannot_read_is_refused() -> None:
    with pytest.raises(ConfigError, match="SCRATCH_DATABASE_URL"):
        config.load({"SCRATCH_DATABASE_URL": "host=db dbname='unterminated"})


@pytest.mark.parametrize(
    ("value", "expected"),
    [("", None), ("zstd", "zstd"), ("ZSTD:3", "zstd:3"), ("gzip:09", "gzip:9"), ("none", "none")],
)
def test_dump_compression_is_normalised(value: str, expected: str | None) -> None:
    assert config.load({"DUMP_COMPRESSION": value}).dump_compression == expected
