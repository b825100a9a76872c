"""Logging: JSON lines by default (SPEC §7), with every known secret masked."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable

from pythonjsonlogger.json import JsonFormatter

MASK = "********"
# password=... in a conninfo string, and user:password@ in a URI.
_CONNINFO_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
_URI_PASSWORD = re.compile(r"(postgres(?:ql)?://[^:/@\s]*:)([^@\s]*)(@)")

log = logging.getLogger("sanitised_dump")


class SecretFilter(logging.Filter):
    """Masks passwords in the message and in every string field of a record."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def mask(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        text = _CONNINFO_PASSWORD.sub(rf"\g<1>{MASK}", text)
        return _URI_PASSWORD.sub(rf"\g<1>{MASK}\g<3>", text)

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.mask(record.getMessage())
        record.args = None
        for key, value in list(record.__dict__.items()):
            if isinstance(value, str) and key not in ("msg", "levelname", "name"):
                setattr(record, key, self.mask(value))
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = self.mask(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


class FieldsFilter(logging.Filter):
    """Adds the same fields to every record (a record's own value wins)."""

    def __init__(self, fields: dict[str, object]) -> None:
        super().__init__()
        self.fields = fields

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in self.fields.items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


def stamp(**fields: object) -> None:
    """Every line from now on carries `fields`, e.g. the run's mode."""
    for handler in log.handlers:
        handler.addFilter(FieldsFilter(fields))


_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class TextFormatter(logging.Formatter):
    """`time LEVEL message key=value ...`: the same fields as JSON, for people."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = {k: v for k, v in vars(record).items() if k not in _STANDARD}
        return " ".join([line, *(f"{k}={v}" for k, v in extras.items())])


def setup(log_format: str = "json", level: str = "INFO", secrets: Iterable[str] = ()) -> None:
    """Log to stderr; stdout stays free for the reports of check, plan and inspect."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(
            JsonFormatter(
                "{asctime}{levelname}{message}",
                style="{",
                rename_fields={"asctime": "time", "levelname": "level"},
                timestamp=False,
            )
        )
    else:
        handler.setFormatter(TextFormatter())
    handler.addFilter(SecretFilter(secrets))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
