"""The seeds the scrub tests stand on: they load, fill every table, and keep the canary rule.

Canary rule: every non-NULL text-like value (text, varchar, char, citext, name,
json, jsonb; each element of an array of these; through domains) of a column
the seed's allow list does not keep contains "canary", and no kept value of any
type does. A dump test that finds "canary" has then found a leaked original.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tests.seed import demo
from tests.seed.jobserver import data as jobserver

CANARY = demo.CANARY
TEXT_TYPES = frozenset({"text", "varchar", "bpchar", "citext", "name", "json", "jsonb"})

Loader = Callable[[psycopg.Connection[Any]], None]
SEEDS: dict[str, tuple[Loader, Path]] = {
    "demo": (demo.load, demo.ALLOW_LIST),
    "jobserver": (jobserver.load, jobserver.ALLOW_LIST),
}

_TABLES = """
SELECT n.nspname, c.relname
FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'
ORDER BY 1, 2
"""
_COLUMNS = """
SELECT a.attname, a.atttypid
FROM pg_attribute AS a
WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""
_TYPES = "SELECT oid, typname, typtype, typbasetype, typelem, typcategory FROM pg_type"


def _split(key: str) -> tuple[str, str]:
    """An allow list key as SPEC §3 reads it: `table` is in public, else split at the first dot."""
    schema, dot, table = key.partition(".")
    return (schema, table) if dot else ("public", key)


class Catalog:
    """What the seeded database holds, read back from its catalog."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self.types = {row[0]: row[1:] for row in conn.execute(_TYPES)}
        self.tables: list[tuple[str, str]] = [tuple(r) for r in conn.execute(_TABLES)]

    def columns(self, schema: str, table: str) -> list[tuple[str, bool, bool]]:
        """(name, text-like, array) for each column."""
        regclass = sql.Identifier(schema, table).as_string(self.conn)
        rows = self.conn.execute(_COLUMNS, [regclass]).fetchall()
        return [(name, *self._text_like(oid)) for name, oid in rows]

    def _text_like(self, oid: int) -> tuple[bool, bool]:
        typname, typtype, basetype, elem, category = self.types[oid]
        if typtype == "d":
            return self._text_like(basetype)
        if category == "A" and elem:
            return self._text_like(elem)[0], True
        return typname in TEXT_TYPES, False


@pytest.fixture(params=sorted(SEEDS))
def seeded(request: pytest.FixtureRequest, source_db: str) -> tuple[str, str]:
    """(seed name, URL of a fresh database holding it)."""
    load, _ = SEEDS[request.param]
    with psycopg.connect(source_db) as conn:
        load(conn)
    return request.param, source_db


def _allow_list(seed: str) -> dict[str, list[str]]:
    data: dict[str, list[str]] = json.loads(SEEDS[seed][1].read_text(encoding="utf-8"))
    return data


def _counts(conn: psycopg.Connection[Any], tables: list[tuple[str, str]]) -> dict[str, int]:
    counts = {}
    for schema, table in tables:
        query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, table))
        counts[f"{schema}.{table}"] = conn.execute(query).fetchone()[0]  # type: ignore[index]
    return counts


def test_every_table_has_rows(seeded: tuple[str, str]) -> None:
    seed, url = seeded
    with psycopg.connect(url) as conn:
        counts = _counts(conn, Catalog(conn).tables)
    if seed == "demo":
        assert counts == demo.TABLES
    else:
        assert len(counts) == jobserver.TABLE_COUNT
        assert set(counts.values()) == {20}, counts


def test_jobserver_rows_sets_the_row_count(source_db: str) -> None:
    with psycopg.connect(source_db) as conn:
        jobserver.load(conn, rows=3)
        counts = _counts(conn, Catalog(conn).tables)
    assert len(counts) == jobserver.TABLE_COUNT
    assert set(counts.values()) == {3}, counts


def test_allow_list_matches_the_seeded_schema(seeded: tuple[str, str]) -> None:
    """Every listed table and column exists; every table but the seed's unlisted ones is listed."""
    seed, url = seeded
    allow = _allow_list(seed)
    with psycopg.connect(url) as conn:
        catalog = Catalog(conn)
        listed = {_split(key) for key in allow}
        assert listed <= set(catalog.tables)
        for key, kept in allow.items():
            names = {name for name, _, _ in catalog.columns(*_split(key))}
            assert set(kept) <= names, f"{key}: not columns: {set(kept) - names}"
            assert len(kept) == len(set(kept)), key
    unlisted = {f"{schema}.{table}" for schema, table in set(catalog.tables) - listed}
    assert unlisted == (demo.UNLISTED if seed == "demo" else set())


def test_canary_rule(seeded: tuple[str, str]) -> None:
    """Kept columns never hold "canary"; faked text-like values always do; no column is all NULL."""
    seed, url = seeded
    allow = {_split(key): set(cols) for key, cols in _allow_list(seed).items()}
    leaks, missing, empty = [], [], []
    faked_nulls = kept_nulls = 0
    with psycopg.connect(url) as conn:
        catalog = Catalog(conn)
        for schema, table in catalog.tables:
            kept_cols = allow.get((schema, table), set())
            for name, text_like, is_array in catalog.columns(schema, table):
                col = sql.Identifier(name)
                has_canary = sql.SQL("strpos({}::text, {}) > 0").format(col, CANARY)
                if name in kept_cols:
                    bad = has_canary
                elif not text_like:
                    bad = sql.SQL("false")
                elif is_array:
                    bad = sql.SQL(
                        "EXISTS (SELECT FROM unnest({}) AS e(v)"
                        " WHERE e.v IS NOT NULL AND strpos(e.v::text, {}) = 0)"
                    ).format(col, CANARY)
                else:
                    bad = sql.SQL("{} IS NOT NULL AND NOT ({})").format(col, has_canary)
                query = sql.SQL(
                    "SELECT count(*) FILTER (WHERE {}), count({}), count(*) - count({}) FROM {}"
                ).format(bad, col, col, sql.Identifier(schema, table))
                n_bad, n_set, n_null = conn.execute(query).fetchone()  # type: ignore[misc]
                where = f"{schema}.{table}.{name}"
                if n_bad:
                    (leaks if name in kept_cols else missing).append(f"{where} ({n_bad} rows)")
                if not n_set:
                    empty.append(where)
                if name in kept_cols:
                    kept_nulls += n_null
                else:
                    faked_nulls += n_null
    assert not leaks, f"kept columns holding {CANARY!r}: {leaks}"
    assert not missing, f"faked text-like values without {CANARY!r}: {missing}"
    assert not empty, f"columns with no value to compare: {empty}"
    assert kept_nulls and faked_nulls, "NULLs in both kept and faked columns"


def test_seed_is_deterministic(seeded: tuple[str, str], target_db: str) -> None:
    """A second load holds the same rows, so tests may compare exact fakes and originals."""
    seed, url = seeded
    load, _ = SEEDS[seed]
    with psycopg.connect(target_db) as conn:
        load(conn)
    digests = []
    for db in (url, target_db):
        with psycopg.connect(db) as conn:
            digest = {}
            for schema, table in Catalog(conn).tables:
                query = sql.SQL(
                    "SELECT md5(string_agg(t::text, E'\\n' ORDER BY t::text)) FROM {} AS t"
                ).format(sql.Identifier(schema, table))
                digest[f"{schema}.{table}"] = conn.execute(query).fetchone()[0]  # type: ignore[index]
            digests.append(digest)
    assert digests[0] == digests[1]
