"""Sentry cron check-ins, sent to a listener on 127.0.0.1 that stands in for Sentry."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator

import pytest

from app import monitoring
from tests.container.sentry_listener import SentryListener

sentry_sdk = pytest.importorskip("sentry_sdk", reason="sentry-sdk (the `sentry` extra) is missing")


@pytest.fixture
def listener() -> Iterator[SentryListener]:
    with SentryListener().running() as running:
        yield running


def test_without_dsn_nothing_is_started_or_sent(listener: SentryListener) -> None:
    with monitoring.checkin({"SENTRY_MONITOR_SLUG": "x"}) as run:
        run.exit_code = 0
    assert run.check_in_id is None
    assert not sentry_sdk.get_client().is_active()
    assert listener.requests == 0


def test_a_successful_run_checks_in_progress_then_ok(listener: SentryListener) -> None:
    env = {
        "SENTRY_DSN": listener.dsn(),
        "SENTRY_MONITOR_SLUG": "nightly-dump",
        "SENTRY_MONITOR_SCHEDULE": "0 3 * * *",
        "SENTRY_ENVIRONMENT": "staging",
    }
    with monitoring.checkin(env) as run:
        time.sleep(0.05)
        run.exit_code = 0

    started, finished = listener.checkins
    assert [started["status"], finished["status"]] == ["in_progress", "ok"]
    assert started["check_in_id"] == finished["check_in_id"] == run.check_in_id
    assert {started["monitor_slug"], finished["monitor_slug"]} == {"nightly-dump"}
    assert started["monitor_config"]["schedule"] == {"type": "crontab", "value": "0 3 * * *"}
    assert started["monitor_config"]["timezone"] == "UTC"
    assert finished["duration"] >= 0.05
    assert finished["environment"] == "staging"


@pytest.mark.parametrize("exit_code", [2, 3, 5, 143])
def test_a_failed_run_checks_in_error(listener: SentryListener, exit_code: int) -> None:
    with monitoring.checkin({"SENTRY_DSN": listener.dsn()}) as run:
        run.exit_code = exit_code
    assert [c["status"] for c in listener.checkins] == ["in_progress", "error"]
    assert listener.checkins[0]["monitor_slug"] == monitoring.DEFAULT_SLUG
    assert "monitor_config" not in listener.checkins[0]  # no schedule: the monitor must exist


def test_an_exception_checks_in_error_and_propagates(listener: SentryListener) -> None:
    with pytest.raises(RuntimeError), monitoring.checkin({"SENTRY_DSN": listener.dsn()}):
        raise RuntimeError("boom")
    assert [c["status"] for c in listener.checkins] == ["in_progress", "error"]
    # Only check-ins leave the process: the exception itself is not reported.
    assert listener.requests == 2


def test_a_bad_schedule_is_a_warning_not_a_failure(
    listener: SentryListener, caplog: pytest.LogCaptureFixture
) -> None:
    env = {"SENTRY_DSN": listener.dsn(), "SENTRY_MONITOR_SCHEDULE": "every night"}
    with caplog.at_level(logging.WARNING, logger="sanitised_dump"), monitoring.checkin(env) as run:
        run.exit_code = 0
    assert "SENTRY_MONITOR_SCHEDULE" in caplog.text
    assert [c["status"] for c in listener.checkins] == ["in_progress", "ok"]
    assert "monitor_config" not in listener.checkins[0]


def test_monitor_config_takes_runtime_margin_and_timezone() -> None:
    config = monitoring.monitor_config(
        {
            "SENTRY_MONITOR_SCHEDULE": "30  2 * * 1-5",
            "SENTRY_MONITOR_TIMEZONE": "Europe/London",
            "SENTRY_MONITOR_MAX_RUNTIME": "90",
            "SENTRY_MONITOR_CHECKIN_MARGIN": "10",
        }
    )
    assert config == {
        "schedule": {"type": "crontab", "value": "30 2 * * 1-5"},
        "timezone": "Europe/London",
        "max_runtime": 90,
        "checkin_margin": 10,
    }


def test_sentry_unreachable_does_not_fail_or_hang_the_run() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    started = time.monotonic()
    with monitoring.checkin({"SENTRY_DSN": f"http://key@127.0.0.1:{port}/1"}) as run:
        run.exit_code = 0
    assert time.monotonic() - started < monitoring.FLUSH_SECONDS + 5


def test_a_malformed_dsn_is_a_warning_and_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    bad = {"SENTRY_DSN": "not-a-dsn-secretkey"}
    with caplog.at_level(logging.WARNING, logger="sanitised_dump"), monitoring.checkin(bad) as run:
        run.exit_code = 0
    assert "SENTRY_DSN is not usable" in caplog.text
    assert "secretkey" not in caplog.text
