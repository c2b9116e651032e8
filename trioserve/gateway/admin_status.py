"""The daemon as a whole: ``/admin/status``, ``/admin/reload``, ``/metrics``."""

from __future__ import annotations

import json
import time
from typing import Any

from quart import Blueprint, Response, request

from trioserve.errors import InvalidRequest
from trioserve.gateway.admin_context import AdminContext, error_response, users_status
from trioserve.reload import ReloadRefused
from trioserve.supervision.supervisor import Supervisor

__all__ = ["status_routes"]


def _queued_by_user(supervisor: Supervisor, model: str) -> dict[str, int]:
    counts = supervisor.models[model].admission.users()
    return {name: each["queued"] for name, each in counts.items() if each["queued"]}


def status_routes(ctx: AdminContext) -> Blueprint:
    routes = Blueprint("status", __name__)
    supervisor, reloader = ctx.supervisor, ctx.reloader

    @routes.get("/admin/status")
    async def admin_status() -> dict[str, Any]:
        last = reloader.last
        return {
            "pid": ctx.pid,
            "version": ctx.version,
            "instance": ctx.instance,
            "started_at": ctx.started_at,
            "uptime_s": round(time.time() - ctx.started_at, 3),
            "last_reload": last.as_dict() if last is not None else None,
            # Whether this request could do admin writes: the page shows itself read-only
            # when not, instead of offering buttons that would fail.
            "admin": ctx.access.is_admin(request.scope, reloader.config),  # type: ignore[arg-type]
            "users": users_status(supervisor, ctx.usage),
            "devices": supervisor.devices(),
            "models": {
                name: {**model.as_dict(), "queued_by_user": _queued_by_user(supervisor, name)}
                for name, model in supervisor.status().items()
            },
            # null when [mcp] enabled = false: no endpoint, rather than one with nobody on it.
            "mcp": ctx.mcp_counts() if ctx.mcp_counts is not None else None,
        }

    @routes.post("/admin/reload")
    async def reload() -> Response:
        try:
            plan = await reloader.reload()
        except ReloadRefused as exc:
            refused = InvalidRequest(f"reload refused, nothing changed: {exc}")
            return error_response(refused)
        return Response(json.dumps(plan.as_dict()), content_type="application/json")

    @routes.get("/metrics")
    async def prometheus() -> Response:
        return Response(
            ctx.metrics.render(), content_type="text/plain; version=0.0.4; charset=utf-8"
        )

    return routes
