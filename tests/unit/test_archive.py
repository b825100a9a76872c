"""Reading a pg_dump archive's header and COPY text without pg_restore."""

from __future__ import annotations

from pathlib import Path

import pytest

from app import archive
from app.errors import ConfigError


def _int(value: int) -> bytes:
    return bytes([1 if value < 0 else 0]) + abs(value).to_bytes(4, "little")


def _str(text: str) -> bytes:
    return _int(len(text.encode())) + text.encode()


def _header(version: tuple[int, int], compression: bytes) -> bytes:
    """A custom-format header as pg_dump writes it (WriteHead)."""
    made = b"".join(_int(v) for v in (5, 4, 3, 2, 1, 125, 0))
    return (
        b"PGDMP"
        + bytes([*version, 0, 4, 8, 1])
        + compression
        + made
        + _str("app")
        + _str("17.2")
        + _str("17.2 (Debian 17.2-1.pgdg120+1)")
        + b"\x00" * 32
    )


@pytest.mark.parametrize(
    ("version", "compression", "expected"),
    [
        ((1, 14), _int(-1), "gzip"),  # pg_dump 14-15: a compression level
        ((1, 14), _int(0), "none"),
        ((1, 16), b"\x03", "zstd"),  # pg_dump 16+: an algorithm byte
    ],
)
def test_header_says_who_wrote_the_archive(
    tmp_path: Path, version: tuple[int, int], compression: bytes, expected: str
) -> None:
    path = tmp_path / "x.dump"
    path.write_bytes(_header(version, compression))
    header = archive.read_header(path)
    assert header.archive_version == f"{version[0]}.{version[1]}"
    assert header.format == "custom"
    assert header.compression == expected
    assert header.database == "app"
    assert header.server_version == "17.2"
    assert header.pg_dump_major == 17


def test_a_directory_archive_is_read_from_its_toc(tmp_path: Path) -> None:
    (tmp_path / "toc.dat").write_bytes(_header((1, 16), b"\x01"))
    assert archive.read_header(tmp_path).compression == "gzip"


@pytest.mark.parametrize("data", [b"", b"PGDMP\x01", b"\x1f\x8b\x08\x00 gzip"])
def test_anything_else_is_refused(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "x.dump"
    path.write_bytes(data)
    with pytest.raises(ConfigError, match="not a sanitised dump"):
        archive.read_header(path)


def test_copy_text_escapes_are_undone() -> None:
    assert archive.copy_field(r'{"a": "b\\\"c\\n"}\td') == '{"a": "b\\"c\\n"}\td'
