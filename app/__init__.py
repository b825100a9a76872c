"""Sanitised dump job: a production-like PostgreSQL dump without personal data."""

from __future__ import annotations

__version__ = "0.1.0"
