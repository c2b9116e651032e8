"""The Quart-Trio app for everything that is not the per-chunk hot path: model list, admin API,
lifecycle events and metrics. Thin: each route calls the supervisor and shapes the answer."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from trioserve.config import Config
from trioserve.errors import InvalidApiKey, InvalidRequest, TrioserveError
from trioserve.gateway.asgi import bearer_ok
from trioserve.gateway.metrics import Metrics
from trioserve.supervision.supervisor import Supervisor

__all__ = ["build_admin_app"]

# A comment line every so often keeps idle event streams alive through proxies.
EVENTS_KEEPALIVE = 15.0


def _error_response(error: TrioserveError) -> Response:
    headers = {k.decode(): v.decode() for k, v in error.headers()}
    return Response(error.body_bytes(), status=error.status, headers=headers)


def build_admin_app(
    config: Config,
    supervisor: Supervisor,
    metrics: Metrics,
    *,
    instance: str,
    started_at: float,
    version: str,
    pid: int,
) -> QuartTrio:
    app = QuartTrio(__name__)
    server = config.server

    @app.before_request
    async def _auth() -> Response | None:
        path = request.path
        if path.startswith("/admin/"):
            keys = server.admin_keys
        elif path.startswith("/v1/"):
            keys = server.api_keys
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
        for name, model in config.models.items():
            for each in [name, *model.aliases]:
                data.append(
                    {
                        "id": each,
                        "object": "model",
                        "created": int(started_at),
                        "owned_by": "trioserve",
                        "state": status[name]["state"],
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
            "models": supervisor.status(),
        }

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
                    with trio.move_on_after(EVENTS_KEEPALIVE) as idle:
                        try:
                            event = await receive.receive()
                        except trio.EndOfChannel:
                            return
                    if idle.cancelled_caught:
                        yield b": keep-alive\n\n"
                        continue
                    yield b"data: " + json.dumps(event.as_dict()).encode() + b"\n\n"

        response = Response(stream(), content_type="text/event-stream")
        response.headers["cache-control"] = "no-cache"
        response.timeout = None
        return response

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), content_type="text/plain; version=0.0.4; charset=utf-8")

    return app
