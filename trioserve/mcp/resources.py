"""The resources: ``trioserve://status`` (JSON, subscribable) and, in admin sessions, the
template ``trioserve://models/{name}/logs`` with completion of ``{name}``; and the requests
MCPServer has no decorator for: ``logging/setLevel``, ``resources/subscribe``,
``resources/unsubscribe`` (registered on its low-level server)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ResourceError
from mcp_types import (
    Completion,
    CompletionArgument,
    CompletionContext,
    EmptyResult,
    PromptReference,
    ResourceTemplateReference,
    SetLevelRequestParams,
    SubscribeRequestParams,
    UnsubscribeRequestParams,
)

from trioserve.config import Config
from trioserve.errors import TrioserveError
from trioserve.mcp.context import caller, model_view
from trioserve.mcp.sessions import Sessions
from trioserve.supervision.supervisor import Supervisor

__all__ = ["LOGS_TEMPLATE", "STATUS_URI", "register_resources"]

STATUS_URI = "trioserve://status"
LOGS_TEMPLATE = "trioserve://models/{name}/logs"
# Lines of a model's output the logs resource gives.
LOG_TAIL = 200


def register_resources(
    mcp: MCPServer[Any],
    supervisor: Supervisor,
    sessions: Sessions,
    counts: Callable[[], dict[str, int]],
    config: Callable[[], Config],
) -> None:
    @mcp.resource(
        STATUS_URI,
        name="status",
        description="The daemon's models (state, in flight, queued, last error) and MCP counts",
        mime_type="application/json",
    )
    async def status() -> str:
        return json.dumps(
            {
                "models": {
                    name: model_view(info.as_dict(), admin=caller().admin)
                    for name, info in supervisor.status().items()
                },
                "mcp": counts(),
            }
        )

    @mcp.resource(
        LOGS_TEMPLATE,
        name="model_logs",
        description="The last lines a model's process wrote (admin sessions only)",
        mime_type="text/plain",
    )
    async def model_logs(name: str) -> str:
        if not caller().admin:
            raise ResourceError("model logs are for admin sessions only")
        try:
            model = supervisor.resolve(name)
        except TrioserveError as exc:
            raise ResourceError(str(exc)) from exc
        return "".join(line + "\n" for line in model.output.tail(LOG_TAIL))

    @mcp.completion()  # type: ignore[untyped-decorator, no-untyped-call]  # untyped in mcp 2.3
    async def complete(
        ref: PromptReference | ResourceTemplateReference,
        argument: CompletionArgument,
        context: CompletionContext | None,
    ) -> Completion | None:
        if not (isinstance(ref, ResourceTemplateReference) and ref.uri == LOGS_TEMPLATE):
            return Completion(values=[])
        if not caller().admin:
            return Completion(values=[])
        names = [n for n in config().models if n.startswith(argument.value)]
        return Completion(values=names[:100], total=len(names), has_more=len(names) > 100)

    def session_id(ctx: ServerRequestContext[Any, Any]) -> str | None:
        request = ctx.request
        headers = getattr(request, "headers", None)
        return headers.get("mcp-session-id") if headers is not None else None

    async def set_level(
        ctx: ServerRequestContext[Any, Any], params: SetLevelRequestParams
    ) -> EmptyResult:
        sid = session_id(ctx)
        if sid:
            sessions.log_level[sid] = params.level
        return EmptyResult()

    async def subscribe(
        ctx: ServerRequestContext[Any, Any], params: SubscribeRequestParams
    ) -> EmptyResult:
        sid = session_id(ctx)
        if sid:
            sessions.subscriptions.setdefault(sid, set()).add(str(params.uri))
        return EmptyResult()

    async def unsubscribe(
        ctx: ServerRequestContext[Any, Any], params: UnsubscribeRequestParams
    ) -> EmptyResult:
        sid = session_id(ctx)
        if sid:
            sessions.subscriptions.get(sid, set()).discard(str(params.uri))
        return EmptyResult()

    # No public accessor in mcp 2.3 (the SDK's own client reaches for it the same way).
    low = mcp._lowlevel_server
    low.add_request_handler("logging/setLevel", SetLevelRequestParams, set_level)
    low.add_request_handler("resources/subscribe", SubscribeRequestParams, subscribe)
    low.add_request_handler("resources/unsubscribe", UnsubscribeRequestParams, unsubscribe)
