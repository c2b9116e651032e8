"""The client side of one relayed request: the response head, then the body in as few sends as
the upstream reads allow.

Sends are made from the request's own task. That is safe because the gateway's connection
(``http_server.LeanTCPServer``) makes a send that cannot be cancelled half-way: Hypercorn updates
h11's state before it writes, so an interrupted send would leave the connection unusable.

Batching: body bytes are held in ``pending`` and sent by ``flush``. The relay calls ``flush``
just before each upstream read (``upstream.LeanStream.before_read``): everything one upstream
read brought goes to the client in one send, however many chunks it held, and nothing waits
longer than it takes to parse them.
"""

from __future__ import annotations

import trio

from trioserve.gateway.asgi import Send

__all__ = ["Downstream"]

Headers = list[tuple[bytes, bytes]]


class Downstream:
    def __init__(self, send: Send) -> None:
        self.send = send
        self._pending = bytearray()
        self._head_done = trio.Event()
        self.started = False  # a response head is being sent (or was)
        self.status = 0
        self.is_event_stream = False
        # The last byte sent ended an SSE event (or nothing was sent yet).
        self.at_event_boundary = True

    async def start(self, status: int, headers: Headers) -> None:
        """Send the response head (once; the caller checks ``started``)."""
        assert not self.started
        # Set before the send awaits: another task of this request (the progress comments)
        # sees at once that the head is taken.
        self.started = True
        self.status = status
        self.is_event_stream = any(
            k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers
        )
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        self._head_done.set()

    def write(self, data: bytes) -> None:
        """Hold body bytes for the next ``flush`` (never blocks)."""
        self._pending += data

    async def flush(self) -> None:
        if not self._pending:
            return
        if not self._head_done.is_set():
            # Hypercorn refuses body before its head's send has returned. Waited for before
            # the bytes are taken: a cancellation here loses none of them.
            await self._head_done.wait()
        # Taken with no await before the send, so bytes written meanwhile go in the next
        # send, in order.
        data = bytes(self._pending)
        self._pending.clear()
        self.at_event_boundary = data.endswith((b"\n\n", b"\r\n\r\n"))
        await self.send({"type": "http.response.body", "body": data, "more_body": True})
