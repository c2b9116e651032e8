"""The live feeds: lifecycle events (``/admin/events``) and the status page's activity
(``/admin/history``, ``/admin/activity``). Streams that never end by themselves: each ends at
the daemon's stop (``stream_ends``)."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator

import trio
from quart import Blueprint, Response

from trioserve.gateway.admin_context import AdminContext, users_status

__all__ = ["stream_routes"]

# A comment line every so often keeps idle event streams alive through proxies.
EVENTS_KEEPALIVE = 15.0


def _sse(event: str, data: object) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def stream_routes(ctx: AdminContext) -> Blueprint:
    routes = Blueprint("streams", __name__)
    supervisor, usage, activity, stream_ends = (
        ctx.supervisor,
        ctx.usage,
        ctx.activity,
        ctx.stream_ends,
    )

    @routes.get("/admin/events")
    async def events() -> Response:
        async def stream() -> AsyncIterator[bytes]:
            async with supervisor.events.subscribe() as receive:
                yield b": trioserve events\n\n"
                while True:
                    with stream_ends.wait(EVENTS_KEEPALIVE) as idle:
                        try:
                            event = await receive.receive()
                        except trio.EndOfChannel:
                            return
                    if stream_ends.closed:
                        return
                    if idle.cancelled_caught:
                        yield b": keep-alive\n\n"
                        continue
                    yield b"data: " + json.dumps(event.as_dict()).encode() + b"\n\n"

        response = Response(stream(), content_type="text/event-stream")
        response.headers["cache-control"] = "no-cache"
        response.timeout = None
        return response

    @routes.get("/admin/history")
    async def history() -> dict[str, object]:
        """The activity chart's data: the last ten minutes, one sample a second per model."""
        return activity.snapshot()

    @routes.get("/admin/activity")
    async def activity_feed() -> Response:
        """SSE for the status page: the whole history once, then each second the new sample
        with every model's status, the per-user figures and the MCP endpoint's, so the page
        never polls."""

        async def stream() -> AsyncIterator[bytes]:
            yield _sse("history", activity.snapshot())
            while True:
                with stream_ends.wait(math.inf):
                    await activity.next_sample()
                if stream_ends.closed:
                    return
                rates = activity.tokens_per_s()
                models = {
                    name: {**model.as_dict(), "tokens_per_s": rates.get(name)}
                    for name, model in supervisor.status().items()
                }
                users = users_status(supervisor, usage)
                # The MCP endpoint's open sessions and calls in flight; null with it off.
                mcp = ctx.mcp_counts() if ctx.mcp_counts is not None else None
                sample = {
                    "at": activity.last_at,
                    "models": models,
                    "users": users,
                    "mcp": mcp,
                    "devices": supervisor.devices(),
                }
                yield _sse("sample", sample)

        response = Response(stream(), content_type="text/event-stream")
        response.headers["cache-control"] = "no-cache"
        response.timeout = None
        return response

    return routes
