"""ASGI plumbing the app's handlers share: whole answers, the request body (whole, or fed to a
parser as it arrives), and noticing that the client left."""

from __future__ import annotations

from collections.abc import Callable

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable

__all__ = ["DisconnectWatcher", "feed_body", "read_body", "send_json", "start_json"]

JSON = b"application/json"


async def start_json(
    send: ASGISendCallable, status: int, length: int, content_type: bytes = JSON
) -> None:
    """The head of a whole answer of ``length`` bytes (JSON unless ``content_type`` says)."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(length).encode()),
            ],
        }
    )


async def send_json(
    send: ASGISendCallable, status: int, body: bytes, content_type: bytes = JSON
) -> None:
    """A whole answer (JSON unless ``content_type`` says)."""
    await start_json(send, status, len(body), content_type)
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def feed_body(receive: ASGIReceiveCallable, feed: Callable[[bytes], None]) -> bool:
    """Hand each piece of the request body to ``feed`` as it arrives; False if the client left
    before sending all of it."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return False
        if message["type"] == "http.request":
            feed(message["body"])
            if not message["more_body"]:
                return True


async def read_body(receive: ASGIReceiveCallable) -> bytes | None:
    """The request body, or None if the client left before sending all of it."""
    parts: list[bytes] = []
    return b"".join(parts) if await feed_body(receive, parts.append) else None


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
