"""Models: the OpenAI list (``/v1/models``; Anthropic's list for Anthropic's clients) and the
admin calls on one model (load, unload, logs)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from quart import Blueprint, Response, request

from trioserve.errors import InvalidRequest
from trioserve.gateway.admin_context import AdminContext

__all__ = ["model_routes"]


def model_routes(ctx: AdminContext) -> Blueprint:
    routes = Blueprint("models", __name__)
    supervisor, reloader = ctx.supervisor, ctx.reloader

    @routes.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        status = supervisor.status()
        names = [
            (each, status[name].state.value)
            for name, model in reloader.config.models.items()
            for each in [name, *model.aliases]
        ]
        if "anthropic-version" in request.headers:
            # Anthropic's SDK (and Claude Code) send it on every call, and read this shape.
            return _anthropic_list(names, ctx.started_at)
        data = [
            {
                "id": each,
                "object": "model",
                "created": int(ctx.started_at),
                "owned_by": "trioserve",
                "state": state,
            }
            for each, state in names
        ]
        return {"object": "list", "data": data}

    @routes.post("/admin/models/<name>/load")
    async def load(name: str) -> dict[str, Any]:
        model = supervisor.resolve(name)
        endpoint = await supervisor.load(model.name)
        return {"model": model.name, "state": model.state.value, "port": endpoint.port}

    @routes.post("/admin/models/<name>/unload")
    async def unload(name: str) -> dict[str, Any]:
        force = request.args.get("force", "false").lower() in ("1", "true", "yes")
        model = supervisor.resolve(name)
        await supervisor.unload(model.name, force=force)
        return {"model": model.name, "state": model.state.value}

    @routes.get("/admin/models/<name>/logs")
    async def logs(name: str) -> Response:
        model = supervisor.resolve(name)
        raw = request.args.get("tail", "100")
        if not raw.isdigit():
            raise InvalidRequest("tail must be a non-negative integer")
        lines = model.output.tail(int(raw))
        text = "".join(line + "\n" for line in lines)
        return Response(text, content_type="text/plain; charset=utf-8")

    return routes


def _anthropic_list(names: list[tuple[str, str]], started_at: float) -> dict[str, Any]:
    created = datetime.fromtimestamp(int(started_at), UTC).isoformat().replace("+00:00", "Z")
    data = [
        {"type": "model", "id": each, "display_name": each, "created_at": created, "state": state}
        for each, state in names
    ]
    return {
        "data": data,
        "has_more": False,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }
