"""Pseudonyms: a fake derived from a keyed hash of the original value (HMAC-SHA256).

Equal originals get equal pseudonyms in every table and every run with the same key, so a
natural key used for joins (an email stored in two tables) still joins in the dump; without
the key nothing links a pseudonym back to its original. That is weaker than the default
fake, which is derived from the row number only: pseudonyms show which rows share a value.

The server computes the HMAC with the built-in `sha256()` (PostgreSQL 11+; no pgcrypto).
The key never appears in a statement's text or parameters, which `log_statement` and
`auto_explain` could log: its two HMAC pads reach a temporary table by COPY, whose data the
server never logs, and the table is dropped when the copy's transaction ends.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg import sql

from app.catalog import TypeInfo
from app.fakes import Unfakeable

KEY_TABLE = sql.Identifier("pg_temp", "sanitised_dump_pseudonym_key")
PREFIX = "pseudonym_"
EMAIL_DOMAIN = "@pseudonym.invalid"  # .invalid is reserved (RFC 6761): it never delivers
TEXT_HEX = 16  # 64 bits: equal pseudonyms for different originals are practically impossible
_BLOCK = 64  # SHA-256's block size in bytes
_TEXT = frozenset({"text", "varchar", "bpchar", "name"})
_INT = {"int2": (4, 16, 32767), "int4": (8, 32, 2147483647)}


def pads(key: str) -> tuple[bytes, bytes]:
    """HMAC's inner and outer pads of `key` (RFC 2104): key XOR 0x36.., key XOR 0x5c.."""
    raw = key.encode()
    if len(raw) > _BLOCK:
        raw = hashlib.sha256(raw).digest()
    raw = raw.ljust(_BLOCK, b"\0")
    return bytes(b ^ 0x36 for b in raw), bytes(b ^ 0x5C for b in raw)


def reference(key: str, value: str) -> bytes:
    """The digest the server computes for `value`, by Python's hmac module (for tests)."""
    return hmac.new(key.encode(), value.encode(), hashlib.sha256).digest()


def install_key(conn: psycopg.Connection[Any], key: str) -> None:
    """Put the key's pads where the copy's statements read them, for this transaction only."""
    inner, outer = pads(key)
    conn.execute(
        sql.SQL(
            "CREATE TEMP TABLE {} (ipad bytea NOT NULL, opad bytea NOT NULL) ON COMMIT DROP"
        ).format(KEY_TABLE)
    )
    with (
        conn.cursor() as cur,
        cur.copy(sql.SQL("COPY {} (ipad, opad) FROM STDIN").format(KEY_TABLE)) as copy,
    ):
        copy.write_row([inner, outer])


def digest(source: sql.Composable) -> sql.Composable:
    """HMAC-SHA256(key, source::text) as a 32-byte bytea: sha256(opad || sha256(ipad || m))."""
    return sql.SQL(
        "sha256((SELECT opad FROM {t}) || sha256((SELECT ipad FROM {t}) || "
        "convert_to({source}::text, 'UTF8')))"
    ).format(t=KEY_TABLE, source=source)


def pseudonym(
    source: sql.Composable, type_oid: int, typmod: int, types: Mapping[int, TypeInfo]
) -> sql.Composable:
    """The pseudonym of `source`, fitted to the column's type; Unfakeable for other types."""
    info = types[type_oid]
    if info.kind == "d":
        base_mod = info.typmod if info.typmod != -1 else typmod
        return pseudonym(source, info.base, base_mod, types)
    hexed = sql.SQL("encode({}, 'hex')").format(digest(source))
    if info.extension == "citext" and info.name == "citext":
        return _text(source, hexed, None)
    if info.schema == "pg_catalog" and info.kind == "b" and not info.is_array:
        if info.name in _TEXT:
            length = 63 if info.name == "name" else (typmod - 4 if typmod >= 4 else None)
            return _text(source, hexed, length)
        if info.name in _INT:
            digits, bits, top = _INT[info.name]
            return sql.SQL("((({} & {}) % {} + 1)::{})").format(
                _bits(hexed, digits, bits, "int"),
                sql.Literal(top),
                sql.Literal(top - 1),
                sql.SQL(info.name),
            )
        if info.name == "int8":
            return sql.SQL("({} + 1)").format(_bits(hexed, 15, 60, "bigint"))
        if info.name == "numeric":
            return _numeric(hexed, typmod)
        if info.name == "uuid":
            # Version nibble 0, as the default fakes: no generator makes such a uuid.
            return sql.SQL("overlay(left({}, 32) placing '0' from 13 for 1)::uuid").format(hexed)
        if info.name == "bytea":
            return sql.SQL("substring({} from 1 for 16)").format(digest(source))
    raise Unfakeable(
        f"type {info.type_sql} cannot be pseudonymised (text, varchar, char, citext, name, "
        "integers, numeric, uuid, bytea and domains over them can)"
    )


def _bits(hexed: sql.Composable, digits: int, bits: int, to: str) -> sql.Composable:
    return sql.SQL("('x' || left({}, {}))::bit({})::{}").format(
        hexed, sql.Literal(digits), sql.Literal(bits), sql.SQL(to)
    )


def _text(source: sql.Composable, hexed: sql.Composable, length: int | None) -> sql.Composable:
    """`pseudonym_<hex>`, or `<hex>@pseudonym.invalid` where the original holds an @ (an
    email column's CHECK still passes), or bare hex where the column is too short."""
    if length is None or length >= TEXT_HEX + len(EMAIL_DOMAIN):
        is_email = sql.SQL("strpos({}::text, '@') > 0").format(source)
        return sql.SQL(
            "(CASE WHEN {at} THEN '' ELSE {prefix} END || left({hex}, {n}) || "
            "CASE WHEN {at} THEN {domain} ELSE '' END)"
        ).format(
            at=is_email,
            prefix=sql.Literal(PREFIX),
            hex=hexed,
            n=sql.Literal(TEXT_HEX),
            domain=sql.Literal(EMAIL_DOMAIN),
        )
    if length >= len(PREFIX) + TEXT_HEX:
        return sql.SQL("({} || left({}, {}))").format(
            sql.Literal(PREFIX), hexed, sql.Literal(TEXT_HEX)
        )
    return sql.SQL("left({}, {})").format(hexed, sql.Literal(min(length, 64)))


def _numeric(hexed: sql.Composable, typmod: int) -> sql.Composable:
    value = _bits(hexed, 15, 60, "bigint")
    if typmod < 4:
        return sql.SQL("({})::numeric").format(value)
    precision = ((typmod - 4) >> 16) & 0xFFFF
    scale = (typmod - 4) & 0xFFFF
    if scale > 1023:
        scale -= 2048
    return sql.SQL("((({} % {})::numeric) * {})").format(
        value, sql.Literal(10**precision), sql.Literal(f"1e{-scale}")
    )
