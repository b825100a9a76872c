"""A table whose kept columns each hold one kind of personal value or secret, for the scan."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import psycopg

ROWS = 20
# column -> the kind the scan must report for it (None: nothing).
KINDS: dict[str, str | None] = {
    "email": "email",
    "phone": "phone",
    "ip4": "ip_address",
    "ip6": "ip_address",
    "jwt": "jwt",
    "api_token": "token",
    "password": "password_hash",
    "nhs_number": "nhs_number",
    "nhs_int": "nhs_number",
    "card": "payment_card",
    "extra": "token",
    "notes": None,
    "slug": None,
    "created_epoch": None,
}
FREE_TEXT = {"notes"}


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def _nhs(i: int) -> str:
    """A valid NHS number (mod 11) in the England range."""
    n = 400_000_000 + i * 7_919
    while True:
        nine = str(n)
        check = 11 - sum(int(d) * w for d, w in zip(nine, range(10, 1, -1), strict=True)) % 11
        check = 0 if check == 11 else check
        if check != 10:
            return nine + str(check)
        n += 1


def _card(i: int) -> str:
    body = f"4{i:014d}"
    for d in "0123456789":
        digits = [int(c) for c in body + d]
        total = sum(digits[-1::-2]) + sum(sum(divmod(2 * x, 10)) for x in digits[-2::-2])
        if total % 10 == 0:
            return f"{body[:4]} {body[4:8]} {body[8:12]} {body[12:]}{d}"
    raise AssertionError


def row(i: int) -> dict[str, Any]:
    digest = hashlib.sha256(f"row-{i}".encode()).hexdigest()
    token = base64.b64encode(hashlib.sha256(f"t-{i}".encode()).digest()).decode()
    return {
        "id": i,
        "email": f"person.{i}@mailbox.co.uk",
        "phone": f"07911 {123000 + i}",
        "ip4": f"81.2.69.{i}",
        "ip6": f"2a00:1450:4009:81f::{i:x}",
        "jwt": f"{_b64({'alg': 'HS256'})}.{_b64({'sub': str(i)})}.{digest[:43]}",
        "api_token": f"sk_live_{token[:24].replace('+', 'x').replace('/', 'y')}",
        "password": f"pbkdf2_sha256$720000${digest[:12]}${token}",
        "nhs_number": _nhs(i)[:3] + " " + _nhs(i)[3:6] + " " + _nhs(i)[6:],
        "nhs_int": int(_nhs(i + 100)),
        "card": _card(i),
        "extra": json.dumps({"access_token": f"gho_{digest[:36]}", "expires_in": 28800}),
        "notes": f"Called on day {i} about the referral; she asked us to send the letter again.",
        "slug": f"study-{i}-workspace",
        "created_epoch": 1_709_544_600 + i,
    }


DDL = """
CREATE TABLE public.people (
    id integer PRIMARY KEY, email text, phone varchar(20), ip4 inet, ip6 inet, jwt text,
    api_token text, password varchar(128), nhs_number text, nhs_int bigint, card text,
    extra jsonb, notes text, slug text, created_epoch bigint
)
"""
ALLOW_LIST = {"people": ["id", *KINDS]}


def load(conn: psycopg.Connection[Any]) -> None:
    conn.execute(DDL)
    rows = [row(i) for i in range(1, ROWS + 1)]
    columns = list(rows[0])
    with conn.cursor() as cur:
        cur.executemany(
            f"INSERT INTO public.people ({', '.join(columns)}) VALUES "
            f"({', '.join(f'%({c})s' for c in columns)})",
            rows,
        )
    conn.commit()
