"""Time as the catalog stores it: naive UTC datetimes (identical on SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, datetime

RFC1123 = "%a, %d %b %Y %H:%M:%S UTC"
ISO = "%Y-%m-%dT%H:%M:%S"


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def rfc1123(value: datetime | None) -> str | None:
    """Rucio's wire format; the client turns every string containing ' UTC' into a datetime."""
    return None if value is None else value.strftime(RFC1123)


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.strftime(ISO)
