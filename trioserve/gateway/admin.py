"""The Quart-Trio app for everything that is not the per-chunk hot path: model list, admin API,
lifecycle events and metrics. Thin: each route calls the supervisor and shapes the answer."""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from trioserve.errors import InvalidApiKey, InvalidRequest, TrioserveError
from trioserve.gateway.activity import ActivityHistory
from trioserve.gateway.asgi import bearer_ok
from trioserve.gateway.identity import ANONYMOUS_NAME
from trioserve.gateway.metrics import Metrics
from trioserve.gateway.stream_ends import StreamEnds
from trioserve.gateway.ui import add_ui_routes
from trioserve.gateway.usage import UsageBook
from trioserve.reload import Reloader, ReloadRefused
from trioserve.supervision.supervisor import Supervisor

__all__ = ["build_admin_app"]

# A comment line every so often keeps idle event streams alive through proxies.
EVENTS_KEEPALIVE = 15.0


def _error_response(error: TrioserveError) -> Response:
    headers = {k.decode(): v.decode() for k, v in error.headers()}
    return Response(error.body_bytes(), status=error.status, headers=headers)


def users_status(supervisor: Supervisor, usage: UsageBook) -> dict[str, dict[str, int]]:
    """Per user (configured names, everyone else as "anonymous"): in flight and queued over
    all models now, requests and tokens since the daemon started."""
    users = {
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
    return users


def _queued_by_user(supervisor: Supervisor, model: str) -> dict[str, int]:
    counts = supervisor.models[model].admission.users()
    return {name: each["queued"] for name, each in counts.items() if each["queued"]}


def _sse(event: str, data: object) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def build_admin_app(
    reloader: Reloader,
    supervisor: Supervisor,
    metrics: Metrics,
    usage: UsageBook,
    activity: ActivityHistory,
    stream_ends: StreamEnds,
    *,
    instance: str,
    started_at: float,
    version: str,
    pid: int,
) -> QuartTrio:
    """The admin app. Its config is ``reloader.config``, read per request: a reload is in
    force for the next request."""
    app = QuartTrio(__name__)
    add_ui_routes(app)

    @app.before_request
    async def _auth() -> Response | None:
        path = request.path
        config = reloader.config
        keys: Sequence[str]
        if path.startswith("/admin/"):
            keys = config.server.admin_keys
        elif path.startswith("/v1/"):
            keys = config.all_api_keys
        else:
            return None
        if not bearer_ok(request.scope, keys):  # type: ignore[arg-type]
            return _error_response(InvalidApiKey())
        return None

    @app.errorhandler(TrioserveError)
    async def _trioserve_error(error: TrioserveError) -> Response:
        return _error_response(error)

    @app.errorhandler(HTTPException)
    async def _http_error(error: HTTPException) -> Response:
        status = error.code or 500
        code = {404: "not_found", 405: "method_not_allowed"}.get(status, "invalid_request")
        body = {
            "error": {
                "message": error.description or error.name,
                "type": "invalid_request_error",
                "code": code,
            }
        }
        return Response(json.dumps(body), status=status, content_type="application/json")

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        status = supervisor.status()
        data = []
        for name, model in reloader.config.models.items():
            for each in [name, *model.aliases]:
                data.append(
                    {
                        "id": each,
                        "object": "model",
                        "created": int(started_at),
                        "owned_by": "trioserve",
                        "state": status[name].state.value,
                    }
                )
        return {"object": "list", "data": data}

    @app.get("/admin/status")
    async def admin_status() -> dict[str, Any]:
        return {
            "pid": pid,
            "version": version,
            "instance": instance,
            "started_at": started_at,
            "uptime_s": round(time.time() - started_at, 3),
            "last_reload": reloader.last.as_dict() if reloader.last is not None else None,
            "users": users_status(supervisor, usage),
            "models": {
                name: {**model.as_dict(), "queued_by_user": _queued_by_user(supervisor, name)}
                for name, model in supervisor.status().items()
            },
        }

    @app.post("/admin/reload")
    async def reload() -> Response:
        try:
            plan = await reloader.reload()
        except ReloadRefused as exc:
            refused = InvalidRequest(f"reload refused, nothing changed: {exc}")
            return _error_response(refused)
        return Response(json.dumps(plan.as_dict()), content_type="application/json")

    @app.post("/admin/models/<name>/load")
    async def load(name: str) -> dict[str, Any]:
        model = supervisor.resolve(name)
        endpoint = await supervisor.load(model.name)
        return {"model": model.name, "state": model.state.value, "port": endpoint.port}

    @app.post("/admin/models/<name>/unload")
    async def unload(name: str) -> dict[str, Any]:
        force = request.args.get("force", "false").lower() in ("1", "true", "yes")
        model = supervisor.resolve(name)
        await supervisor.unload(model.name, force=force)
        return {"model": model.name, "state": model.state.value}

    @app.get("/admin/models/<name>/logs")
    async def logs(name: str) -> Response:
        model = supervisor.resolve(name)
        raw = request.args.get("tail", "100")
        if not raw.isdigit():
            raise InvalidRequest("tail must be a non-negative integer")
        lines = model.output.tail(int(raw))
        text = "".join(line + "\n" for line in lines)
        return Response(text, content_type="text/plain; charset=utf-8")

    @app.get("/admin/events")
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

    @app.get("/admin/history")
    async def history() -> dict[str, object]:
        """The activity chart's data: the last ten minutes, one sample a second per model."""
        return activity.snapshot()

    @app.get("/admin/activity")
    async def activity_feed() -> Response:
        """SSE for the status page: the whole history once, then each second the new sample
        with every model's status and the per-user figures, so the page never polls."""

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
                sample = {"at": activity.last_at, "models": models, "users": users}
                yield _sse("sample", sample)

        response = Response(stream(), content_type="text/event-stream")
        response.headers["cache-control"] = "no-cache"
        response.timeout = None
        return response

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), content_type="text/plain; version=0.0.4; charset=utf-8")

    return app
