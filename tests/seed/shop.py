"""A small shop for the allow list's object form: a value set on every row, pseudonymised
emails that join two tables, and a sessions table copied as structure only."""

from __future__ import annotations

from typing import Any

import psycopg

KEY = "shop-test-key-0123456789abcdef"
SQL = """
CREATE TABLE public.customers (
    id integer PRIMARY KEY,
    email text NOT NULL UNIQUE,
    name text NOT NULL,
    tier text CHECK (tier IN ('free', 'pro')),
    referral text UNIQUE,
    contact varchar(40) CHECK (contact LIKE '%@%'),
    external uuid,
    points bigint
);
CREATE TABLE public.sessions (
    key text PRIMARY KEY,
    customer_id integer NOT NULL REFERENCES public.customers (id),
    data text NOT NULL
);
CREATE INDEX sessions_customer ON public.sessions (customer_id);
CREATE TABLE public.orders (
    id integer PRIMARY KEY,
    customer_id integer NOT NULL REFERENCES public.customers (id),
    customer_email text REFERENCES public.customers (email),
    session_key text REFERENCES public.sessions (key),
    total numeric(8, 2) NOT NULL
);
INSERT INTO public.customers
SELECT i,
       'shopper' || i || '@gmail.com',
       'Customer ' || i,
       CASE WHEN i % 4 = 0 THEN NULL WHEN i % 2 = 0 THEN 'pro' ELSE 'free' END,
       CASE WHEN i % 5 = 0 THEN NULL ELSE 'friend-' || i END,
       CASE WHEN i % 3 = 0 THEN NULL ELSE 'contact' || i || '@gmail.com' END,
       md5('ext-' || (i % 10))::uuid,
       1000 + i
FROM generate_series(1, 30) AS i;
INSERT INTO public.sessions
SELECT md5('session-' || i), 1 + i % 30, 'secret session data ' || i
FROM generate_series(1, 10) AS i;
INSERT INTO public.orders
SELECT i, 1 + i % 30,
       CASE WHEN i % 7 = 0 THEN NULL ELSE 'shopper' || (1 + i % 30) || '@gmail.com' END,
       CASE WHEN i % 2 = 0 THEN md5('session-' || (1 + i % 10)) END,
       i * 1.25
FROM generate_series(1, 60) AS i;
"""

ALLOW_LIST: dict[str, Any] = {
    "$schema": "../../app/allow_list.schema.json",
    "customers": {
        "keep": ["id", "name", "points"],
        "set": {"tier": "free", "referral": "ref-{n}", "contact": "c{n}@example.com"},
        "pseudonymise": ["email", "external"],
        "note": "tier: the application knows free and pro only",
    },
    "orders": {
        "keep": ["id", "customer_id", "total"],
        "set": {"session_key": None},
        "pseudonymise": ["customer_email"],
    },
    "sessions": {"rows": "none", "note": "session keys are credentials"},
}


def load(conn: psycopg.Connection[Any]) -> None:
    conn.execute(SQL)
    conn.commit()
