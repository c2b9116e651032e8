"""The work-around for a client that goes away in the middle of a call (mcp 2.3).

At the handshake versions, the SDK does not cancel a call whose POST's client disconnected
without ``notifications/cancelled``: the handler runs to its end and the answer is dropped
(the spec says a disconnect is not a cancel, because a client may resume the stream; we keep
no event store, so nobody can). A model would go on generating for nobody. So: the endpoint
puts a ``ClientGone`` in the request's ASGI scope and watches its ``receive`` for
``http.disconnect``; the middleware around ``tools/call`` finds it through the Starlette
``Request`` the transport built on that scope, and runs the call in a cancel scope that the
disconnect cancels. It needs someone in ``receive()`` while the call runs: sse-starlette's
disconnect listener is, on the SSE responses we always use (``json_response=False``).
"""

from __future__ import annotations

from typing import Any

import trio
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp_types import CallToolResult, TextContent

from trioserve.gateway.asgi import Message, Receive, Scope, Send

__all__ = ["GONE_KEY", "ClientGone", "cancel_when_client_gone"]

GONE_KEY = "trioserve.mcp_client_gone"


class ClientGone:
    """One POST's watch: ``gone`` once its client disconnected before the answer's end."""

    def __init__(self) -> None:
        self.gone = False
        self.finished = False
        self.scope: trio.CancelScope | None = None

    def wrap(self, receive: Receive, send: Send) -> tuple[Receive, Send]:
        async def watched_receive() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect" and not self.finished:
                self.gone = True
                if self.scope is not None:
                    self.scope.cancel()
            return message

        async def watched_send(message: Message) -> None:
            if self.gone:
                # Nobody to send to: Hypercorn refuses a response start on a closed stream
                # (UnexpectedMessageError, logged as an error of the framework).
                return
            if message["type"] == "http.response.body" and not message.get("more_body"):
                self.finished = True
            await send(message)

        return watched_receive, watched_send

    def install(self, scope: Scope) -> None:
        scope[GONE_KEY] = self


async def cancel_when_client_gone(
    ctx: ServerRequestContext[Any, Any], call_next: CallNext
) -> HandlerResult:
    request_scope = getattr(ctx.request, "scope", None)
    holder = request_scope.get(GONE_KEY) if isinstance(request_scope, dict) else None
    if not isinstance(holder, ClientGone):
        return await call_next(ctx)
    with trio.CancelScope() as scope:
        holder.scope = scope
        if holder.gone:
            scope.cancel()
        return await call_next(ctx)
    # Nobody reads this: the client is gone. The SDK needs a result all the same.
    return CallToolResult(
        content=[TextContent(type="text", text="the client went away")], is_error=True
    )
