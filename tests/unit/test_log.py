"""No secret in a log line, whatever the message or field carries it."""

from __future__ import annotations

import json
import logging

import pytest

from app import log


def emit(capsys: pytest.CaptureFixture[str], message: str, **extra: object) -> str:
    log.setup("json", "INFO", secrets=["s3cr3t-Pa55"])
    log.log.error(message, extra=extra)
    return capsys.readouterr().err


def test_known_password_is_masked_in_message_and_fields(capsys: pytest.CaptureFixture[str]) -> None:
    out = emit(capsys, "failed with s3cr3t-Pa55", detail="again s3cr3t-Pa55")
    assert "s3cr3t-Pa55" not in out
    record = json.loads(out)
    assert record["message"] == f"failed with {log.MASK}"
    assert record["detail"] == f"again {log.MASK}"


@pytest.mark.parametrize(
    "text",
    [
        "postgresql://app:hunter2@db.internal:5432/prod",
        "host=db password=hunter2 dbname=prod",
        "host=db password='hunter2' dbname=prod",
    ],
)
def test_passwords_in_connection_strings_are_masked(
    capsys: pytest.CaptureFixture[str], text: str
) -> None:
    out = emit(capsys, f"cannot connect to {text}")
    assert "hunter2" not in out
    assert "db" in out


def test_text_format_carries_the_fields(capsys: pytest.CaptureFixture[str]) -> None:
    log.setup("text", "INFO")
    log.log.info("table copied", extra={"table": "public.users", "rows": 3})
    out = capsys.readouterr().err
    assert "table copied" in out and "table=public.users" in out and "rows=3" in out
    logging.getLogger("sanitised_dump").handlers.clear()


def test_stamped_fields_are_on_every_line_but_a_line_may_say_otherwise(
    capsys: pytest.CaptureFixture[str],
) -> None:
    log.setup("json", "INFO")
    log.stamp(mode="embedded")
    log.log.info("run started")
    log.log.error("failed", extra={"exit_code": 4})
    log.log.info("explicit", extra={"mode": "other"})
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [line["mode"] for line in lines] == ["embedded", "embedded", "other"]
    log.setup("json", "INFO")  # a new setup starts without the stamp
    log.log.info("fresh")
    assert "mode" not in json.loads(capsys.readouterr().err)
