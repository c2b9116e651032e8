"""``/admin/usage``'s answer from the state store's hourly rows (pure: no I/O, the time given).

``since`` is a duration back from now (``30m``, ``24h``, ``7d``; also ``s`` and ``w``) or an ISO
date or datetime (UTC unless it names an offset). Rows are per UTC hour, so the answer covers
whole hours: from the start of the hour ``since`` falls in, and its ``since`` says so.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from trioserve.errors import InvalidRequest
from trioserve.host.store import UsageRow
from trioserve.sharing.budgets import DAY, HOUR

__all__ = ["DEFAULT_SINCE", "iso_utc", "parse_since", "usage_report"]

DEFAULT_SINCE = "1d"
_UNITS = {"s": 1, "m": 60, "h": HOUR, "d": DAY, "w": 7 * DAY}
_DURATION = re.compile(r"(\d{1,12})([smhdw])")


def parse_since(text: str, now: float) -> float:
    """UNIX time of ``since`` (never before 1970); ``InvalidRequest`` for anything else."""
    text = text.strip()
    duration = _DURATION.fullmatch(text)
    if duration is not None:
        return max(0.0, now - int(duration[1]) * _UNITS[duration[2]])
    try:
        when = datetime.fromisoformat(text)  # a date alone is its midnight
    except ValueError:
        raise InvalidRequest(
            f"since: {text[:100]!r} is neither a duration (30m, 24h, 7d) nor an ISO date or "
            "datetime (2024-05-01, 2024-05-01T12:00:00Z)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp())


def iso_utc(seconds: float) -> str:
    """``2024-05-01T12:00:00Z``."""
    return datetime.fromtimestamp(int(seconds), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _counts() -> dict[str, int]:
    return {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}


def _add(counts: dict[str, Any], row: UsageRow) -> None:
    counts["requests"] += row.requests
    counts["prompt_tokens"] += row.prompt_tokens
    counts["completion_tokens"] += row.completion_tokens


def usage_report(rows: Iterable[UsageRow], since_hour: int, until: float) -> dict[str, Any]:
    """``{"since", "until", "users": {NAME: {"requests", "prompt_tokens",
    "completion_tokens", "by_model": {MODEL: {…}}, "by_day": {"YYYY-MM-DD": {…}}}}}`` of the
    rows from ``since_hour`` on; users with no rows there are not listed."""
    users: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row.hour < since_hour:
            continue
        user = users.get(row.user)
        if user is None:
            user = users[row.user] = {**_counts(), "by_model": {}, "by_day": {}}
        _add(user, row)
        _add(user["by_model"].setdefault(row.model, _counts()), row)
        day = datetime.fromtimestamp(row.hour * HOUR, UTC).date().isoformat()
        _add(user["by_day"].setdefault(day, _counts()), row)
    return {"since": iso_utc(since_hour * HOUR), "until": iso_utc(until), "users": users}
