"""The ASGI entry point: ``/health`` and the relay paths are answered here directly, ``/mcp``
goes to the MCP endpoint (injected: the gateway does not import ``trioserve.mcp``); everything
else goes to the Quart-Trio admin app.

``/health`` is answered before any routing, auth or framework work: it awaits nothing but its
own two sends, so it never waits behind a model, a lock or a queue.
"""

from __future__ import annotations

from typing import Any

import trio

from trioserve.config import Config
from trioserve.errors import InvalidRequest
from trioserve.gateway.asgi import Message, Receive, Scope, Send, send_error
from trioserve.gateway.browser_guard import BrowserGuard
from trioserve.gateway.passthrough import relayed_api
from trioserve.gateway.relay import Relay

__all__ = ["Gateway"]

_HEALTH_BODY = b'{"status":"ok"}'
_HEALTH_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(_HEALTH_BODY)).encode()),
]
# trioserve.server.listener.HEALTH_STATE_KEY: where the server puts its ``Liveness`` (the
# answer while the daemon drains or its loop stalled) in each request's ``scope["state"]``.
_HEALTH_STATE_KEY = "trioserve.liveness"
MCP_PATH = "/mcp"
# Stored responses: OpenAI keeps them by id; trioserve cannot tell which model holds one.
_STORED_RESPONSES = "/v1/responses/"


_CANNOT_ROUTE = InvalidRequest(
    "trioserve cannot route a stored response: the request names no model, and each model "
    "server keeps its own responses. Send previous_response_id in a POST /v1/responses "
    "that names the model instead.",
    status=404,
)


class Gateway:
    def __init__(
        self, config: Config, relay: Relay, admin_app: Any, mcp_app: Any | None = None
    ) -> None:
        self.relay = relay
        self.admin_app = admin_app
        # The ASGI app of /mcp (trioserve.mcp.McpEndpoint), or None: /mcp is then not found.
        self.mcp_app = mcp_app
        self.config = config

    @property
    def config(self) -> Config:
        return self._config

    @config.setter
    def config(self, config: Config) -> None:
        """At start and on reload: the names a request's Host may carry come with it."""
        self._config = config
        self.browser_guard = BrowserGuard(config.server.host, config.server.allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path == "/health":
                # The same answer the listener gives at accept time (draining, stalled); the
                # app alone, without our server, is simply ok.
                liveness = scope.get("state", {}).get(_HEALTH_STATE_KEY)
                status, body = (200, _HEALTH_BODY) if liveness is None else liveness.status()
                headers = (
                    _HEALTH_HEADERS
                    if body == _HEALTH_BODY
                    else [_HEALTH_HEADERS[0], (b"content-length", str(len(body)).encode())]
                )
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            is_mcp = path == MCP_PATH
            refused = self.browser_guard.check(
                scope["method"], scope["headers"], origin_always=is_mcp
            )
            if refused is not None:
                await send_error(send, refused)
                return
            if is_mcp:
                if self.mcp_app is None:
                    await send_error(
                        send, InvalidRequest("/mcp is off ([mcp] enabled = false)", status=404)
                    )
                    return
                await self.mcp_app(scope, receive, send)
                return
            if relayed_api(scope["method"], path) is not None:
                # The relay checks the key (and learns whose it is) before reading the body.
                await self.relay(scope, receive, send)
                return
            if path.startswith(_STORED_RESPONSES) and scope["method"] in ("GET", "DELETE"):
                await send_error(send, _CANNOT_ROUTE)
                return
        if scope["type"] != "http":
            await self.admin_app(scope, receive, send)
            return
        await self._admin(scope, receive, send)

    async def _admin(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve the Quart-Trio app, holding back ``http.disconnect`` until its last send is
        done: Hypercorn queues the disconnect from inside that send, and Quart-Trio cancels
        its request task when it sees one, which would land inside Hypercorn's send and leave
        a ``Connection: close`` socket open."""
        last_send_done = trio.Event()
        in_last_send = False

        async def guarded_receive() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect" and in_last_send:
                await last_send_done.wait()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal in_last_send
            last = message["type"] == "http.response.body" and not message.get("more_body")
            if not last:
                await send(message)
                return
            in_last_send = True
            try:
                await send(message)
            finally:
                last_send_done.set()

        await self.admin_app(scope, guarded_receive, guarded_send)
