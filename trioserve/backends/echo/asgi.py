"""ASGI plumbing the app's handlers share: JSON and event-stream answers, the request body, and
noticing that the client left."""

from __future__ import annotations

from typing import Final

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable

__all__ = ["DisconnectWatcher", "read_body", "send_json", "start_json", "start_sse"]

_SSE_HEADERS: Final = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


async def start_json(send: ASGISendCallable, status: int, length: int) -> None:
    """The head of a JSON answer of ``length`` bytes."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(length).encode()),
            ],
        }
    )


async def send_json(send: ASGISendCallable, status: int, body: bytes) -> None:
    """A whole JSON answer."""
    await start_json(send, status, len(body))
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def start_sse(send: ASGISendCallable) -> None:
    """The head of a 200 event stream; its events follow as bodies with ``more_body``."""
    await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})


async def read_body(receive: ASGIReceiveCallable) -> bytes | None:
    """The request body, or None if the client left before sending all of it."""
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        if message["type"] == "http.request":
            parts.append(message["body"])
            if not message["more_body"]:
                return b"".join(parts)


class DisconnectWatcher:
    """Cancels a scope as soon as the client goes away.

    Hypercorn does not fail ``send`` once the client is gone (it drops the bytes silently), so
    without this a generation would run to its end for nobody; ``http.disconnect`` arriving on
    ``receive`` is the only prompt signal, and it arrives even while the app is asleep.
    """

    def __init__(self, receive: ASGIReceiveCallable) -> None:
        self._receive = receive
        self.client_left = False

    async def run(self, cancel_scope: trio.CancelScope) -> None:
        """Wait for ``http.disconnect``; then cancel ``cancel_scope``."""
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.client_left = True
                cancel_scope.cancel()
                return
