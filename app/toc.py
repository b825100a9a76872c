"""A dump of the scratch schema that restores like the source: ordinary tables, checked keys.

Scratch tables are UNLOGGED, so that the copy writes next to no WAL on the source, and its
foreign keys are added NOT VALID, because rows copied from one snapshot already satisfy
them. pg_dump writes both into the archive: a restored UNLOGGED table would vanish at the
developer's next crash and refuse foreign keys from ordinary tables, and a NOT VALID key
would differ from production. So these definitions in the archive's table of contents are
rewritten in place, `CREATE UNLOGGED TABLE` to `CREATE TABLE` and `... NOT VALID;` to
`...;`, padded with spaces to the same length: no length, offset or data byte changes, the
archive stays exactly what pg_restore expects, and the restore checks the keys as it does
for any dump.

The layout is pg_dump's (src/bin/pg_dump/pg_backup_archiver.c: WriteHead, WriteToc;
pg_backup_custom.c: the data offset after each entry) for archive versions 1.14 to 1.16,
written by pg_dump 14 to 18. Before writing anything the whole table of contents is read
and every data offset checked against the data block it points at; any surprise raises.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path

from app.errors import PgDumpError

MAGIC = b"PGDMP"
CUSTOM_FORMAT = 1
VERSIONS = ((1, 14), (1, 15), (1, 16))  # archive versions of pg_dump 14-15, 16, 17-18
PG_DUMP_MAJORS = range(14, 19)
BLOCK_DATA = 1
OFFSET_SET = 2
UNLOGGED = b"CREATE UNLOGGED TABLE "
LOGGED = b"CREATE          TABLE "  # the same length
NOT_VALID = b" NOT VALID;\n"
VALID = b";          \n"  # the same length


def supported(pg_dump_major: int) -> bool:
    """Whether this module knows the archive layout of that pg_dump."""
    return pg_dump_major in PG_DUMP_MAJORS


@dataclass(frozen=True)
class Entry:
    dump_id: int
    desc: bytes
    tag: bytes
    defn: bytes
    defn_at: int  # file offset of the definition's first byte
    data_at: int | None  # file offset of its data block, if it has one


class _Reader:
    """Reads pg_dump's integers (a sign byte, then little-endian bytes) and strings (a
    length, -1 for NULL, then the bytes)."""

    def __init__(self, data: bytes | mmap.mmap, path: Path) -> None:
        self.data = data
        self.at = 0
        self.path = path
        self.int_size = 4

    def fail(self, what: str) -> PgDumpError:
        return PgDumpError(f"{self.path}: unexpected custom-format archive ({what})")

    def raw(self, n: int) -> bytes:
        if n < 0 or self.at + n > len(self.data):
            raise self.fail(f"truncated at byte {self.at}")
        chunk = self.data[self.at : self.at + n]
        self.at += n
        return chunk

    def byte(self) -> int:
        return self.raw(1)[0]

    def int(self) -> int:
        sign = self.byte()
        value = int.from_bytes(self.raw(self.int_size), "little")
        return -value if sign else value

    def str(self) -> bytes | None:
        length = self.int()
        return None if length < 0 else self.raw(length)


def read_toc(path: Path) -> list[Entry]:
    """Every entry of the table of contents, data offsets checked. The file is mapped, not
    read: only the pages of the table of contents and of the block headers are touched."""
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as m:
        r = _Reader(m, path)
        entries = _entries(r)
        for entry in entries:
            if entry.data_at is None:
                continue
            r.at = entry.data_at
            if r.byte() != BLOCK_DATA or r.int() != entry.dump_id:
                raise r.fail(f"the data offset of entry {entry.dump_id} points elsewhere")
        return entries


def _entries(r: _Reader) -> list[Entry]:
    if r.raw(len(MAGIC)) != MAGIC:
        raise r.fail("no PGDMP header")
    version = (r.byte(), r.byte())
    r.byte()  # revision
    r.int_size = r.byte()
    offset_size = r.byte()
    if version not in VERSIONS or r.byte() != CUSTOM_FORMAT or not 1 <= r.int_size <= 8:
        raise r.fail(f"version {version[0]}.{version[1]} or format not known")
    if version >= (1, 15):
        r.byte()  # compression algorithm
    else:
        r.int()  # compression level
    for _ in range(7):  # creation time
        r.int()
    for _ in range(3):  # database name, server version, pg_dump version
        r.str()
    entries = []
    for _ in range(r.int()):
        dump_id = r.int()
        r.int()  # has a data dumper
        r.str()  # table oid
        r.str()  # oid
        tag = r.str() or b""
        desc = r.str() or b""
        r.int()  # section
        defn_at = r.at + 1 + r.int_size
        defn = r.str() or b""
        r.str()  # drop statement
        r.str()  # copy statement
        r.str()  # namespace
        r.str()  # tablespace
        r.str()  # table access method
        if version >= (1, 16):
            r.int()  # relkind
        r.str()  # owner
        if r.str() != b"false":  # "with oids", always false since 12
            raise r.fail(f"entry {dump_id}")
        while r.str() is not None:  # dependencies, then a NULL
            pass
        state = r.byte()
        offset = int.from_bytes(r.raw(offset_size), "little")
        entries.append(
            Entry(dump_id, desc, tag, defn, defn_at, offset if state == OFFSET_SET else None)
        )
    return entries


@dataclass(frozen=True)
class Rewritten:
    tables: list[str]  # made ordinary tables
    foreign_keys: list[str]  # "table constraint", checked at restore


def rewrite(path: Path, foreign_keys: list[tuple[str, str]]) -> Rewritten:
    """Make every UNLOGGED table ordinary, and every foreign key of `foreign_keys` (table,
    constraint), added NOT VALID by the job, a checked one; in place."""
    wanted = {f"{table} {name}".encode() for table, name in foreign_keys}
    entries = read_toc(path)
    tables = [e for e in entries if e.desc == b"TABLE" and e.defn.startswith(UNLOGGED)]
    keys = [
        e
        for e in entries
        if e.desc == b"FK CONSTRAINT" and e.tag in wanted and e.defn.endswith(NOT_VALID)
    ]
    if len(keys) != len(wanted):
        found = {e.tag for e in keys}
        missing = ", ".join(sorted(t.decode() for t in wanted - found))
        raise PgDumpError(f"{path}: no NOT VALID foreign key {missing} in the dump")
    fd = os.open(path, os.O_WRONLY)
    try:
        for entry in tables:
            os.pwrite(fd, LOGGED, entry.defn_at)
        for entry in keys:
            os.pwrite(fd, VALID, entry.defn_at + len(entry.defn) - len(NOT_VALID))
    finally:
        os.close(fd)
    for entry in read_toc(path):
        if (entry.desc == b"TABLE" and entry.defn.startswith(UNLOGGED)) or (
            entry.tag in wanted and entry.defn.endswith(NOT_VALID)
        ):
            raise PgDumpError(f"{path}: {entry.tag.decode()} is unchanged after the rewrite")
    return Rewritten([e.tag.decode() for e in tables], [e.tag.decode() for e in keys])
