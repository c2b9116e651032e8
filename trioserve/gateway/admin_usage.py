"""``GET /admin/usage?since=7d``: per user, per model, per day, from the state store.

A read, open as ``/admin/status`` is. The store is at most a second behind the daemon
(``usage_keeper.py``); ``/admin/status``'s totals are since the daemon started, these since
``since`` across restarts.
"""

from __future__ import annotations

import time
from typing import Any

import trio
from quart import Blueprint, Response, request

from trioserve.errors import InvalidRequest
from trioserve.gateway.admin_context import AdminContext, error_response
from trioserve.gateway.usage_report import DEFAULT_SINCE, parse_since, usage_report
from trioserve.host.store import StateStore
from trioserve.sharing.budgets import HOUR

__all__ = ["usage_routes"]


def usage_routes(ctx: AdminContext) -> Blueprint:
    routes = Blueprint("usage", __name__)
    # The daemon's own state dir: a reload cannot move it (the lock and the store stay).
    store = StateStore(ctx.reloader.config.state_dir)

    @routes.get("/admin/usage")
    async def usage() -> Response | dict[str, Any]:
        now = time.time()
        try:
            since = parse_since(request.args.get("since", DEFAULT_SINCE), now)
        except InvalidRequest as error:
            return error_response(error)
        since_hour = int(since // HOUR)
        # A read-only connection in a worker thread: WAL lets it run beside the writer.
        rows = await trio.to_thread.run_sync(store.usage, since_hour)
        return usage_report(rows, since_hour, now)

    return routes
