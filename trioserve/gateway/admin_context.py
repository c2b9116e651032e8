"""What the admin routes are given: the parts of the running daemon they report on and act on.

Its config is ``reloader.config``, read per request: a reload is in force for the next request.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from quart import Response

from trioserve.errors import TrioserveError
from trioserve.gateway.activity import ActivityHistory
from trioserve.gateway.admin_access import AdminAccess
from trioserve.gateway.metrics import Metrics
from trioserve.gateway.stream_ends import StreamEnds
from trioserve.gateway.usage import UsageBook
from trioserve.reload import Reloader
from trioserve.sharing.identity import ANONYMOUS_NAME
from trioserve.supervision.supervisor import Supervisor

__all__ = ["AdminContext", "error_response", "users_status"]


@dataclass(frozen=True)
class AdminContext:
    access: AdminAccess
    reloader: Reloader
    supervisor: Supervisor
    metrics: Metrics
    usage: UsageBook
    activity: ActivityHistory
    stream_ends: StreamEnds
    instance: str
    started_at: float
    version: str
    pid: int
    # The MCP endpoint's {"sessions", "calls_in_flight"}, when it runs ([mcp] enabled).
    mcp_counts: Callable[[], dict[str, int]] | None = None


def error_response(error: TrioserveError) -> Response:
    headers = {k.decode(): v.decode() for k, v in error.headers()}
    return Response(error.body_bytes(), status=error.status, headers=headers)


def users_status(supervisor: Supervisor, usage: UsageBook) -> dict[str, dict[str, Any]]:
    """Per user (configured names, everyone else as "anonymous"): in flight and queued over
    all models now, requests and tokens since the daemon started; for a user with budgets,
    what remains of each (``"remaining"``)."""
    users: dict[str, dict[str, Any]] = {
        name: {
            "in_flight": 0,
            "queued": 0,
            "requests": totals.requests,
            "prompt_tokens": totals.prompt_tokens,
            "completion_tokens": totals.completion_tokens,
        }
        for name, totals in usage.totals.items()
    }
    for model in supervisor.models.values():
        for name, counts in model.admission.users().items():
            entry = users.get(name) or users[ANONYMOUS_NAME]
            entry["in_flight"] += counts["in_flight"]
            entry["queued"] += counts["queued"]
    for name, remaining in usage.budgets.remaining(time.time()).items():
        if name in users:
            users[name]["remaining"] = remaining
    return users
