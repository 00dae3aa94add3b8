"""Explicit verification time. The library never reads the clock; callers pass `now`."""

from __future__ import annotations

from datetime import UTC, datetime


def require_aware(now: datetime) -> datetime:
    """Return `now` in UTC; a naive datetime is ambiguous and therefore refused."""
    if not isinstance(now, datetime):
        raise TypeError(f"now must be a datetime, not {type(now).__name__}")
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware (e.g. datetime(..., tzinfo=UTC))")
    return now.astimezone(UTC)


def unix_seconds(now: datetime) -> int:
    """Whole seconds since the epoch, as dcap-qvl expects."""
    return int(require_aware(now).timestamp())
