"""Models: the OpenAI list (``/v1/models``) and the admin calls on one model (load, unload,
logs)."""

from __future__ import annotations

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
        data = []
        for name, model in reloader.config.models.items():
            for each in [name, *model.aliases]:
                data.append(
                    {
                        "id": each,
                        "object": "model",
                        "created": int(ctx.started_at),
                        "owned_by": "trioserve",
                        "state": status[name].state.value,
                    }
                )
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
