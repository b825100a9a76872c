"""Deterministic fake values (SPEC §4), as SQL expressions the server evaluates.

A fake depends on the table, the column and the row number `n` only, never on the
original value. Text-like fakes read `<column>_<n>`; where the type is too short, a
shorter form `<stem>_<hex n>` or plain hex keeps them distinct. Numbers are offset per
column so that they do not simply repeat a small counter.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from psycopg import sql

from app.catalog import TypeInfo

# Anything wider than this prints `<column>_<n>` in full for any bigint n.
_DECIMAL_DIGITS = 19
_INT_MAX = {"int2": 32767, "int4": 2147483647}
_TEXT = frozenset({"text", "varchar", "bpchar", "name"})
_EPOCH = "2000-01-01 00:00:00"
_SECONDS_IN_100_YEARS = 3_153_600_000

TypeRef = Callable[[TypeInfo], sql.Composable]


class Unfakeable(Exception):
    """The column's type has no fake: the job stops before any write (exit 3)."""


@dataclass(frozen=True)
class Target:
    """What a fake must fit: the column, where it lives, and whether it must be unique."""

    table: str  # schema.table of the source, part of the per-column seed
    column: str
    unique: bool


def column_seed(table: str, column: str) -> int:
    digest = hashlib.sha256(f"{table}\x00{column}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def fake(
    target: Target,
    type_oid: int,
    typmod: int,
    types: Mapping[int, TypeInfo],
    type_ref: TypeRef,
    n: sql.Composable,
) -> sql.Composable:
    """The SQL expression of the fake for row `n`; raises Unfakeable for other types."""
    info = types[type_oid]
    if info.kind == "d":
        # A domain's modifier lives in pg_type.typtypmod; its CHECKs apply on insert.
        base_mod = info.typmod if info.typmod != -1 else typmod
        return fake(target, info.base, base_mod, types, type_ref, n)
    if info.is_array:
        element = fake(target, info.element, typmod, types, type_ref, n)
        return sql.SQL("ARRAY[{}]").format(element)
    if info.kind == "e":
        if not info.labels:
            raise Unfakeable(f"enum {info.qualified} has no labels")
        return sql.SQL("(enum_range(NULL::{}))[1 + ({} + {}) % {}]").format(
            type_ref(info), n, sql.Literal(_offset(target, 1000)), sql.Literal(len(info.labels))
        )
    if info.kind == "r" and info.schema == "pg_catalog" and info.range_subtype is not None:
        return _range(target, info, types, type_ref, n)
    if info.extension == "citext" and info.name == "citext":
        return _text(target, None, n)
    if info.schema == "pg_catalog" and info.kind == "b":
        maker = _BUILTIN.get(info.name)
        if maker is not None:
            return maker(target, typmod, n)
    raise Unfakeable(f"type {info.type_sql} has no fake")


def _offset(target: Target, modulus: int) -> int:
    return column_seed(target.table, target.column) % modulus


def _shifted(target: Target, n: sql.Composable, low: int, modulus: int) -> sql.Composable:
    """`low + (n + offset) % modulus`: distinct for up to `modulus` rows."""
    return sql.SQL("({} + ({} + {}) % {})").format(
        sql.Literal(low), n, sql.Literal(_offset(target, modulus)), sql.Literal(modulus)
    )


def _text(target: Target, length: int | None, n: sql.Composable) -> sql.Composable:
    stem = target.column
    if length is None or length >= len(stem) + 1 + _DECIMAL_DIGITS:
        return sql.SQL("({} || {}::text)").format(sql.Literal(stem + "_"), n)
    # Too short for the full form: `<stem>_<hex>` cut to fit, then bare hex. The hex after
    # the last underscore identifies the row, so the forms never collide.
    hexed = sql.SQL("to_hex({})").format(n)
    overflow = (
        hexed if target.unique else sql.SQL("right({}, {})").format(hexed, sql.Literal(length))
    )
    return sql.SQL(
        "(CASE WHEN length({h}) < {L} THEN left({stem}, {L} - length({h}) - 1) || '_' || {h}"
        " ELSE {overflow} END)"
    ).format(h=hexed, L=sql.Literal(length), stem=sql.Literal(stem), overflow=overflow)


def _char_length(typmod: int) -> int | None:
    return typmod - 4 if typmod >= 4 else None


def _text_builtin(target: Target, typmod: int, n: sql.Composable, name: str) -> sql.Composable:
    length = 63 if name == "name" else _char_length(typmod)
    if name == "bpchar" and length is None and typmod == -1:
        length = None
    return _text(target, length, n)


def _integer(name: str) -> Callable[[Target, int, sql.Composable], sql.Composable]:
    def make(target: Target, typmod: int, n: sql.Composable) -> sql.Composable:
        if name == "int8":
            offset = 1_000_000_000 + _offset(target, 1_000_000_000)
            return sql.SQL("({} + {})").format(n, sql.Literal(offset))
        top = _INT_MAX[name]
        return sql.SQL("{}::{}").format(_shifted(target, n, 1, top), sql.SQL(name))

    return make


def _numeric(target: Target, typmod: int, n: sql.Composable) -> sql.Composable:
    if typmod < 4:
        return sql.SQL("({} + {})::numeric").format(n, sql.Literal(_offset(target, 1_000_000)))
    precision = ((typmod - 4) >> 16) & 0xFFFF
    scale = (typmod - 4) & 0xFFFF
    if scale > 1023:  # negative scales are stored as 11-bit two's complement
        scale -= 2048
    digits = sql.SQL("({} + {}) % {}").format(
        n, sql.Literal(_offset(target, 10 ** min(precision, 6))), sql.Literal(10**precision)
    )
    return sql.SQL("(({})::numeric * {})").format(digits, sql.Literal(f"1e{-scale}"))


def _float(target: Target, typmod: int, n: sql.Composable) -> sql.Composable:
    return sql.SQL("(({} + {})::float8 + 0.25)").format(n, sql.Literal(_offset(target, 1_000_000)))


def _money(target: Target, typmod: int, n: sql.Composable) -> sql.Composable:
    return sql.SQL("((({} + {})::numeric / 100)::money)").format(
        n, sql.Literal(_offset(target, 1_000_000))
    )


def _boolean(target: Target, typmod: int, n: sql.Composable) -> sql.Composable:
    return sql.SQL("(({} + {}) % 2 = 0)").format(n, sql.Literal(_offset(target, 2)))


def _date(target: Target, typmod: int, n: sql.Composable) -> sql.Composable:
    span = 2_000_000 if target.unique else 36_500
    return sql.SQL("(DATE '2000-01-01' + ({})::int)").format(_shifted(target, n, 0, span))


def _seconds(target: Target, n: sql.Composable) -> sql.Composable:
    return sql.SQL("(interval '1 second' * {})").format(
        _shifted(target, n, 0, _SECONDS_IN_100_YEARS)
    )


def _timestamp(target: Target, typmod: int, n: sql.Composable) -> sql.Composable:
    return sql.SQL("(TIMESTAMP {} + {})").format(sql.Literal(_EPOCH), _seconds(target, n))


def _timestamptz(target: Target, typmod: int, n: sql.Composable) -> sql.Composable:
    return sql.SQL("(TIMESTAMPTZ {} + {})").format(sql.Literal(_EPOCH + "+00"), _seconds(target, n))


def _time(target: Target, typmod: int, n: sql.Composable) -> sql.Composable:
    return sql.SQL("(TIME '00:00' + interval '1 microsecond' * {})").format(
        _shifted(target, n, 0, 86_400_000_000)
    )


def _timetz(target: Target, typmod: int, n: sql.Composable) -> sql.Composable:
    return sql.SQL("(({})::text || '+00')::timetz").format(_time(target, typmod, n))


def _interval(target: Target, typmod: int, n: sql.Composable) -> sql.Composable:
    return _seconds(target, n)


def _uuid(target: Target, typmod: int, n: sql.Composable) -> sql.Composable:
    # Version nibble 0: no generator makes such a uuid, so it never equals a real one.
    head = f"{_offset(target, 16**8):08x}-0000-0000-0000-"
    return sql.SQL("({} || lpad(to_hex({}), 12, '0'))::uuid").format(sql.Literal(head), n)


def _json(kind: str) -> Callable[[Target, int, sql.Composable], sql.Composable]:
    def make(target: Target, typmod: int, n: sql.Composable) -> sql.Composable:
        return sql.SQL("{}_build_object('fake', {})").format(sql.SQL(kind), _text(target, None, n))

    return make


def _bytea(target: Target, typmod: int, n: sql.Composable) -> sql.Composable:
    return sql.SQL("convert_to('fake:' || {}, 'UTF8')").format(_text(target, None, n))


def _inet(target: Target, typmod: int, n: sql.Composable) -> sql.Composable:
    # 2001:db8::/32 is reserved for documentation: never a real address.
    return sql.SQL("('2001:db8::'::inet + ({} + {}))").format(
        n, sql.Literal(_offset(target, 1_000_000))
    )


def _cidr(target: Target, typmod: int, n: sql.Composable) -> sql.Composable:
    return sql.SQL("network(set_masklen('2001:db8::'::inet + ({} + {}) * 65536, 112))").format(
        n, sql.Literal(_offset(target, 1_000_000))
    )


def _macaddr(digits: int) -> Callable[[Target, int, sql.Composable], sql.Composable]:
    # First octet fa: locally administered, so never a manufacturer's address.
    def make(target: Target, typmod: int, n: sql.Composable) -> sql.Composable:
        name = "macaddr" if digits == 12 else "macaddr8"
        return sql.SQL("('fa' || lpad(to_hex({}), {}, '0'))::{}").format(
            _shifted(target, n, 0, 16 ** min(digits - 2, 15)),
            sql.Literal(digits - 2),
            sql.SQL(name),
        )

    return make


def _bits(target: Target, typmod: int, n: sql.Composable, varying: bool) -> sql.Composable:
    length = typmod if typmod > 0 else 64
    bits64 = sql.SQL("({} + {})::bit(64)").format(n, sql.Literal(_offset(target, 1_000_000)))
    if length <= 64:
        value = sql.SQL("substring({} from {})").format(bits64, sql.Literal(65 - length))
    else:
        value = sql.SQL("lpad({}::text, {}, '0')::varbit").format(bits64, sql.Literal(length))
    return value if varying else sql.SQL("{}::bit({})").format(value, sql.Literal(length))


def _xml(target: Target, typmod: int, n: sql.Composable) -> sql.Composable:
    return sql.SQL("xmlelement(name fake, {})").format(_text(target, None, n))


def _tsvector(target: Target, typmod: int, n: sql.Composable) -> sql.Composable:
    return sql.SQL("array_to_tsvector(ARRAY[{}])").format(_text(target, None, n))


def _range(
    target: Target,
    info: TypeInfo,
    types: Mapping[int, TypeInfo],
    type_ref: TypeRef,
    n: sql.Composable,
) -> sql.Composable:
    assert info.range_subtype is not None
    low = fake(target, info.range_subtype, -1, types, type_ref, n)
    step = {"daterange": "1", "tsrange": "interval '1 hour'", "tstzrange": "interval '1 hour'"}
    return sql.SQL("{}({}, {} + {})").format(
        sql.Identifier(info.name), low, low, sql.SQL(step.get(info.name, "1"))
    )


_Maker = Callable[[Target, int, sql.Composable], sql.Composable]
_BUILTIN: dict[str, _Maker] = {
    **{
        name: (lambda t, m, n, name=name: _text_builtin(t, m, n, name))  # type: ignore[misc]
        for name in _TEXT
    },
    "int2": _integer("int2"),
    "int4": _integer("int4"),
    "int8": _integer("int8"),
    "numeric": _numeric,
    "float4": _float,
    "float8": _float,
    "money": _money,
    "bool": _boolean,
    "date": _date,
    "time": _time,
    "timetz": _timetz,
    "timestamp": _timestamp,
    "timestamptz": _timestamptz,
    "interval": _interval,
    "uuid": _uuid,
    "json": _json("json"),
    "jsonb": _json("jsonb"),
    "bytea": _bytea,
    "inet": _inet,
    "cidr": _cidr,
    "macaddr": _macaddr(12),
    "macaddr8": _macaddr(16),
    "bit": lambda t, m, n: _bits(t, m, n, varying=False),
    "varbit": lambda t, m, n: _bits(t, m, n, varying=True),
    "xml": _xml,
    "tsvector": _tsvector,
}
