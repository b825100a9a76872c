"""Optional Sentry cron check-ins around a run: in progress, then ok or error.

Off unless SENTRY_DSN is set; sentry-sdk is the `sentry` extra (the image has
it). Only check-ins leave the process: no error events, breadcrumbs or logs,
so nothing from the database or the environment reaches Sentry. Monitoring
never fails the job: a problem with it is one warning in the log.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from app import __version__

log = logging.getLogger("sanitised_dump")

DEFAULT_SLUG = "sanitised-dump"
FLUSH_SECONDS = 5.0
# Five crontab fields, or a nickname such as @daily.
_CRONTAB = re.compile(r"^(@\w+|(\S+\s+){4}\S+)$")


@dataclass
class Run:
    """Filled in by the caller: the run's exit code decides ok (0) or error."""

    exit_code: int | None = None
    check_in_id: str | None = None


def monitor_config(env: Mapping[str, str]) -> dict[str, Any] | None:
    """The monitor's settings, sent with each check-in so Sentry creates or updates it.

    Without SENTRY_MONITOR_SCHEDULE none is sent: the monitor must then exist in
    Sentry. Leave it unset while the CronJob is suspended, or Sentry reports
    every scheduled run that did not happen as missed.
    """
    schedule = " ".join(env.get("SENTRY_MONITOR_SCHEDULE", "").split())
    if not schedule:
        return None
    if not _CRONTAB.match(schedule):
        log.warning(
            "SENTRY_MONITOR_SCHEDULE is not a crontab schedule such as '0 3 * * *': "
            "check-ins are sent without a monitor configuration"
        )
        return None
    config: dict[str, Any] = {
        "schedule": {"type": "crontab", "value": schedule},
        "timezone": env.get("SENTRY_MONITOR_TIMEZONE", "").strip() or "UTC",
    }
    for key, name in (
        ("max_runtime", "SENTRY_MONITOR_MAX_RUNTIME"),
        ("checkin_margin", "SENTRY_MONITOR_CHECKIN_MARGIN"),
    ):
        raw = env.get(name, "").strip()
        if raw.isdigit() and int(raw) > 0:
            config[key] = int(raw)
        elif raw:
            log.warning(f"{name} must be a whole number of minutes, not {raw!r}: ignored")
    return config


@contextmanager
def checkin(env: Mapping[str, str]) -> Iterator[Run]:
    """Wrap one run; set `.exit_code` on what it yields. A no-op without SENTRY_DSN.

    with monitoring.checkin(os.environ) as run:
        run.exit_code = run_dump(config, args)
    return run.exit_code
    """
    run = Run()
    dsn = env.get("SENTRY_DSN", "").strip()
    if not dsn:
        yield run
        return
    client = _start(dsn, env)
    if client is None:
        yield run
        return
    slug = env.get("SENTRY_MONITOR_SLUG", "").strip() or DEFAULT_SLUG
    config = monitor_config(env)
    run.check_in_id = _send(slug, "in_progress", monitor_config=config)
    started = time.monotonic()
    status = "error"
    try:
        yield run
        status = "ok" if run.exit_code in (0, None) else "error"
    except SystemExit as exc:
        status = "ok" if exc.code in (0, None) else "error"
        raise
    finally:
        _send(
            slug,
            status,
            check_in_id=run.check_in_id,
            duration=time.monotonic() - started,
            monitor_config=config,
        )
        try:
            client.close(timeout=FLUSH_SECONDS)
        except Exception as exc:
            log.warning(f"Sentry check-in not delivered: {type(exc).__name__}")


def _start(dsn: str, env: Mapping[str, str]) -> Any:
    try:
        import sentry_sdk
    except ImportError:
        log.warning(
            "SENTRY_DSN is set but sentry-sdk is not installed (the `sentry` extra): "
            "no cron check-ins"
        )
        return None
    try:
        sentry_sdk.init(
            dsn=dsn,
            environment=env.get("SENTRY_ENVIRONMENT", "").strip() or None,
            release=f"sanitised-dump@{__version__}",
            default_integrations=False,
            auto_enabling_integrations=False,
            max_breadcrumbs=0,
            shutdown_timeout=FLUSH_SECONDS,
        )
    except Exception as exc:
        # The DSN carries a key: name the variable, never its value.
        log.warning(f"SENTRY_DSN is not usable ({type(exc).__name__}): no cron check-ins")
        return None
    log.info("sending Sentry cron check-ins")
    return sentry_sdk.get_client()


def _send(slug: str, status: str, **kwargs: Any) -> str | None:
    from sentry_sdk.crons import capture_checkin

    try:
        check_in_id: str | None = capture_checkin(monitor_slug=slug, status=status, **kwargs)
    except Exception as exc:
        log.warning(f"Sentry check-in {status!r} failed: {type(exc).__name__}")
        return None
    return check_in_id
