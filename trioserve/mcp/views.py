"""The per-caller view of the one MCPServer, as a ``ServerMiddleware`` (public API): admin
tools and the logs template hidden from other sessions (and refused when called), the
``chat`` tool's ``model`` enum from the live config, the capabilities MCPServer does not
announce by itself, the count of calls in flight, and the cancel of a call whose client went
away (``gone.py``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp_types import CallToolResult, TextContent

from trioserve.config import Config
from trioserve.mcp.context import CALLER
from trioserve.mcp.gone import cancel_when_client_gone
from trioserve.mcp.resources import LOGS_TEMPLATE
from trioserve.mcp.sessions import Sessions
from trioserve.mcp.tools import ADMIN_TOOLS, model_names

__all__ = ["Views"]


class Views:
    """The middleware; one per endpoint."""

    def __init__(self, sessions: Sessions, config: Callable[[], Config]) -> None:
        self.sessions = sessions
        self.config = config

    async def __call__(
        self, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        method = ctx.method
        found = CALLER.get()
        admin = found is not None and found.admin
        if method == "notifications/initialized":
            session_id = _session_id(ctx)
            if session_id:
                # Its standalone channel (the GET stream) carries list_changed, updates, logs.
                self.sessions.by_id[session_id] = ctx.session
        if method == "tools/call":
            name = (ctx.params or {}).get("name")
            if name in ADMIN_TOOLS and not admin:
                return CallToolResult(
                    content=[TextContent(type="text", text=f"Unknown tool: {name}")],
                    is_error=True,
                )
            self.sessions.calls_in_flight += 1
            try:
                return await cancel_when_client_gone(ctx, call_next)
            finally:
                self.sessions.calls_in_flight -= 1
        result = await call_next(ctx)
        if not isinstance(result, dict):
            return result
        if method == "initialize":
            capabilities = result.setdefault("capabilities", {})
            capabilities.setdefault("tools", {})["listChanged"] = True
            capabilities.setdefault("resources", {})["subscribe"] = True
        elif method == "tools/list":
            result["tools"] = [t for t in result["tools"] if admin or t["name"] not in ADMIN_TOOLS]
            names = model_names(self.config())
            for tool in result["tools"]:
                if tool["name"] in ("chat", "embed") and names:
                    tool["inputSchema"]["properties"]["model"]["enum"] = names
        elif method == "resources/templates/list" and not admin:
            result["resourceTemplates"] = [
                t for t in result["resourceTemplates"] if t["uriTemplate"] != LOGS_TEMPLATE
            ]
        return result


def _session_id(ctx: ServerRequestContext[Any, Any]) -> str | None:
    headers = getattr(ctx.request, "headers", None)
    return headers.get("mcp-session-id") if headers is not None else None
