"""The scan's patterns: each kind of personal value or secret is found and redacted; the
job's own fakes, documentation values and ordinary application data are not."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.scan import ColumnScan, copy_blocks, detect, is_prose, luhn, nhs_valid, redact

JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkFkYSJ9."
    "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)
FOUND = [
    ("email", "ada.lovelace@gmail.com"),
    ("email", "Reply to Grace <grace.hopper@navy.mil.uk> please"),
    ("phone", "+44 7911 123456"),
    ("phone", "07911 123456"),
    ("phone", "(020) 8123 4567"),
    ("phone", "+1 415 867 5309"),
    ("ip_address", "81.2.69.160"),
    ("ip_address", "last login from 10.1.2.3"),
    ("ip_address", "2a00:1450:4009:81f::200e"),
    ("jwt", JWT),
    ("token", "ghp_aBcD1234567890aBcD1234567890aBcD1234"),
    ("token", "k3j4h5g6f7d8s9a0q1w2e3r4t5y6u7i8"),  # a Django session key
    ("token", "3f2a9c0e1d2b3a4f5e6d7c8b9a0f1e2d"),  # 32 hex: token_hex(16), md5
    ("token", '{"access_token": "gho_16C7e42F292c6912E7710c838347Ae178B4a", "expires": 1}'),
    ("token", "Zx8vQ2mN4pL7rT1wY5bK9cH3jF6gD0sA"),
    ("password_hash", "pbkdf2_sha256$720000$Yy3mYq$Zm9vYmFyYmF6cXV4Zm9vYmFyYmF6cXV4Zm9vYmE="),
    ("password_hash", "$2b$12$KIXQJQ1lS1p1Gm1hHc5hUOnvJ6t4eAW8i2b0m2QzGQe6b0y7WfW7S"),
    ("password_hash", "argon2$argon2id$v=19$m=102400,t=2,p=8$c29tZXNhbHQ$RdescudvJCsgt3ub+b+dW"),
    ("password_hash", "$6$rounds=5000$saltsalt$Kz2qWm8vQ4pL7rT1wY5bK9cH3jF6gD0sAx8vQ2mN4pL"),
    ("password_hash", "SCRAM-SHA-256$4096:c2FsdA==$c3RvcmVka2V5:c2VydmVya2V5"),
    ("nhs_number", "943 476 5919"),
    ("nhs_number", "NHS no. 9434765919"),
    ("payment_card", "4111 1111 1111 1111"),
    ("payment_card", "5555-5555-5555-4444"),
    ("payment_card", "378282246310005"),
]


@pytest.mark.parametrize(("kind", "value"), FOUND)
def test_each_kind_is_found_and_its_example_redacted(kind: str, value: str) -> None:
    found, _ = detect(value)
    assert list(found) == [kind], found
    example = redact(kind, found[kind])
    assert example != found[kind]
    # The secret material (the second half: a hash's digest, a token's body, a number's
    # digits) never shows: no five characters of it in a row.
    secret = re.sub(r"\W", "", found[kind][len(found[kind]) // 2 :])
    shown = re.sub(r"\W", "", example)
    assert not any(secret[i : i + 5] in shown for i in range(len(secret) - 4)), example


NOT_FOUND = [
    # the job's own fakes (SPEC §4) and pseudonyms
    "email_123",
    "password_hash_40",
    "1a2b3c4d-0000-0000-0000-00000000001f",
    "2001:db8::4d2",
    '{"fake": "profile_12"}',
    "fake:avatar_3",
    "pseudonym_0123456789abcdef",
    "0b3a9a9f473da2a7@pseudonym.invalid",
    # reserved for documentation: they identify nobody
    "user5@example.org",
    "someone@shop.example",
    "+44 7700 900123",
    "0161 496 0000",
    "203.0.113.5",
    "198.51.100.23",
    "::1",
    "127.0.0.1",
    # ordinary application data
    "2024-03-04 09:30:00+00",
    "09:30:00",
    "1709544600000",
    "da39a3ee5e6b4b0d3255bfef95601890afd80709",  # a git commit
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",  # a file's sha256
    "01HQ3Z8K5N6M7P8Q9R0S1T2V3W",  # ULID
    "550e8400-e29b-41d4-a716-446655440000",
    "StaffAreaAdministrator",
    "study-12-workspace-main",
    "ehrql:v1 generate-dataset analysis/d5.py",
    "https://github.com/opensafely/study-5",
    "output/table-5.csv",
    "POS-2025-1005",
    "4111111111111112",  # fails Luhn
    "9434765918",  # fails mod 11
    "3.14159265358979",
    "1.2.840.113549",
    '{"items": ["col-5"], "n": 5, "source": "x.y"}',
    "{billing,support}",
]


@pytest.mark.parametrize("value", NOT_FOUND)
def test_fakes_documentation_values_and_ordinary_data_are_not_found(value: str) -> None:
    assert detect(value)[0] == {}


def test_a_check_digit_that_passes_by_chance_does_not_flag_a_column() -> None:
    """Epoch seconds are ten digits, and one in eleven passes the NHS check."""
    epochs = ColumnScan("t", "created")
    for second in range(1_709_544_600, 1_709_544_600 + 200):
        epochs.add(str(second))
    assert 0 < epochs.matched["nhs_number"] < epochs.failed["nhs_number"]
    assert epochs.counts == {}
    numbers = ColumnScan("t", "nhs")
    for value in ("943 476 5919", "401 023 2137", "9434765919"):
        numbers.add(value)
    assert numbers.counts == {"nhs_number": 3}


def _with_check_digit(nine: str) -> str | None:
    total = sum(int(d) * w for d, w in zip(nine, range(10, 1, -1), strict=True))
    check = (11 - total % 11) % 11
    return None if check == 10 else nine + str(check)


@given(st.text("0123456789", min_size=9, max_size=9), st.integers(1, 9))
def test_nhs_check_digit(nine: str, shift: int) -> None:
    number = _with_check_digit(nine)
    if number is None:
        assert not any(nhs_valid(nine + str(d)) for d in range(10))
        return
    assert nhs_valid(number)
    wrong = number[:9] + str((int(number[9]) + shift) % 10)
    assert not nhs_valid(wrong)


@given(st.text("0123456789", min_size=12, max_size=18), st.integers(1, 9))
def test_luhn(body: str, shift: int) -> None:
    check = next(d for d in "0123456789" if luhn(body + d))
    assert sum(luhn(body + d) for d in "0123456789") == 1
    assert not luhn(body + str((int(check) + shift) % 10))


def test_free_text_is_long_text_of_many_words() -> None:
    assert is_prose("Met the team on Tuesday; they asked for a new data extract by Friday.")
    assert is_prose('{"bio": "Ada likes canary yellow and long walks by the river Thames"}')
    assert not is_prose('{"source": "jobserver_backend.rap_api_state", "n": 5, "items": []}')
    assert not is_prose("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    assert not is_prose("status description 5")


def test_copy_blocks_of_a_pg_restore_script() -> None:
    script = [
        "SET client_encoding = 'UTF8';\n",
        'COPY "My Schema"."Odd ""Table""" (id, "Full Name", note) FROM stdin;\n',
        "1\tAda\\tLovelace\tline\\none\n",
        "2\t\\N\tback\\\\slash \\101\\x42\n",
        "\\.\n",
        "COPY s.t (a) FROM stdin;\n",
        "\\.\n",
    ]
    blocks = [(t, c, list(rows)) for t, c, rows in copy_blocks(script)]
    assert blocks == [
        (
            ("My Schema", 'Odd "Table"'),
            ["id", "Full Name", "note"],
            [["1", "Ada\tLovelace", "line\none"], ["2", None, "back\\slash AB"]],
        ),
        (("s", "t"), ["a"], []),
    ]
