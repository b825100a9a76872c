"""The demo source database: a small web application seeded with canaries.

Every non-NULL text-like value of a column that `ALLOW_LIST` does not keep
contains `CANARY`, and no kept value does, so finding `CANARY` in a dump means
an original value leaked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg

HERE = Path(__file__).resolve().parent
SEED_SQL = HERE / "demo.sql"
ALLOW_LIST = HERE.parents[1] / "allow_list.json"
CANARY = "canary"

# Every table the seed creates, with its row count ("schema.table").
TABLES: dict[str, int] = {
    "public.orgs": 40,
    "public.users": 400,
    "public.projects": 120,
    "public.audit_events": 1000,
    "public.api_sessions": 150,
    "billing.invoices": 200,
}
# The one table the allow list leaves out: none of its rows may reach a dump.
UNLISTED = frozenset({"public.api_sessions"})


def load(conn: psycopg.Connection[Any]) -> None:
    """Create and fill the demo schema in the (empty) database of `conn`, and commit."""
    conn.execute(SEED_SQL.read_text(encoding="utf-8"))
    conn.commit()


def allow_list() -> dict[str, list[str]]:
    """The demo allow list, keys as written in the file (SPEC §3)."""
    data: dict[str, list[str]] = json.loads(ALLOW_LIST.read_text(encoding="utf-8"))
    return data
