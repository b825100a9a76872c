"""Names a reviewer should look at twice before keeping a column."""

from __future__ import annotations

import pytest

from app.report import looks_sensitive


@pytest.mark.parametrize(
    "name",
    [
        "email",
        "user_email",
        "phone",
        "mobile_number",
        "password",
        "password_hash",
        "api_token",
        "client_secret",
        "session_key",
        "full_name",
        "firstName",
        "last_name",
        "address",
        "street_address",
        "postcode",
        "date_of_birth",
        "ip",
        "last_login_ip",
        "notes",
        "nhs_number",
        "card_number",
    ],
)
def test_sensitive_names_are_flagged(name: str) -> None:
    assert looks_sensitive(name)


@pytest.mark.parametrize(
    "name", ["id", "created_at", "status", "org_id", "is_admin", "amount", "zipper", "tips"]
)
def test_ordinary_names_are_not(name: str) -> None:
    assert not looks_sensitive(name)
