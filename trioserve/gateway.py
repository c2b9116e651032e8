"""The ASGI entry point: ``/health`` and the relay paths are answered here directly; everything
else goes to the Quart-Trio admin app.

``/health`` is answered before any routing, auth or framework work: it awaits nothing but its
own two sends, so it never waits behind a model, a lock or a queue.
"""

from __future__ import annotations

from typing import Any

from .asgi import Receive, Scope, Send, bearer_ok, send_error
from .config import Config
from .errors import InvalidApiKey
from .relay import Relay, RelayPaths

__all__ = ["Gateway"]

_HEALTH_BODY = b'{"status":"ok"}'
_HEALTH_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(_HEALTH_BODY)).encode()),
]


class Gateway:
    def __init__(self, config: Config, relay: Relay, admin_app: Any) -> None:
        self.config = config
        self.relay = relay
        self.admin_app = admin_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path == "/health":
                await send(
                    {"type": "http.response.start", "status": 200, "headers": _HEALTH_HEADERS}
                )
                await send({"type": "http.response.body", "body": _HEALTH_BODY})
                return
            if path in RelayPaths and scope["method"] == "POST":
                if not bearer_ok(scope, self.config.server.api_keys):
                    await send_error(send, InvalidApiKey())
                    return
                await self.relay(scope, receive, send)
                return
        await self.admin_app(scope, receive, send)
