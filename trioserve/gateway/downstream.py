"""The client side of one relayed request: the response head, then the body in as few sends as
the upstream reads allow, and an error told the one way the response's state still allows.

Sends are made from the request's own task. That is safe because the gateway's connection
(``trioserve.server.hypercorn_serve.LeanTCPServer``) makes a send that cannot be cancelled
half-way: Hypercorn updates h11's state before it writes, so an interrupted send would leave
the connection unusable.

Batching: the relay calls ``send_body`` once per upstream read, with everything that read
brought (``UpstreamResponse.receive_some``), so one send carries however many chunks the read
held, and nothing waits longer than it takes to parse them. ``write`` + ``flush`` hold bytes
for a later send (progress comments, the error event).
"""

from __future__ import annotations

import trio

from trioserve.errors import TrioserveError
from trioserve.gateway.apis import Dialect
from trioserve.gateway.asgi import Send, send_json

__all__ = ["Downstream"]

Headers = list[tuple[bytes, bytes]]
# Longest a failed request's answer to its client may take: the send is shielded.
FAIL_SEND_LIMIT = 5.0


class Downstream:
    def __init__(self, send: Send, dialect: Dialect = "openai") -> None:
        self.send = send
        # Anthropic's paths: errors in Anthropic's shape, an error in a stream an
        # ``event: error``.
        self.anthropic = dialect == "anthropic"
        self._pending = bytearray()
        self._head_done = trio.Event()
        self.started = False  # a response head is being sent (or was)
        self.status = 0
        self.is_event_stream = False
        # The last byte sent ended an SSE event (or nothing was sent yet).
        self.at_event_boundary = True
        # Headers every answer to this request carries, whatever it is (a budget's
        # x-ratelimit-*), after its own.
        self.extra: Headers = []

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
        if self.extra:
            headers = [*headers, *self.extra]
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
        await self._send_body(data)

    async def send_body(self, data: bytes) -> None:
        """``write(data)`` then ``flush()``, without copying ``data`` when nothing is held."""
        if self._pending or not self._head_done.is_set():
            self.write(data)
            await self.flush()
        elif data:
            await self._send_body(data)

    async def _send_body(self, data: bytes) -> None:
        self.at_event_boundary = data.endswith((b"\n\n", b"\r\n\r\n"))
        await self.send({"type": "http.response.body", "body": data, "more_body": True})

    async def fail(self, error: TrioserveError) -> None:
        """Tell the client about ``error`` as far as what was sent allows (shielded, bounded)."""
        with trio.CancelScope(shield=True, deadline=trio.current_time() + FAIL_SEND_LIMIT):
            body = error.anthropic_body() if self.anthropic else error.body_bytes()
            if not self.started:
                self.status = error.status
                headers = [h for h in error.headers() if h[0] != b"content-type"]
                await send_json(self.send, error.status, body, headers + self.extra)
            elif not self.is_event_stream:
                # A plain body with a Content-Length is on its way: there is no way to say
                # "error" inside it. Sending nothing more makes Hypercorn close the connection,
                # so the client sees a truncated answer rather than corrupt JSON.
                return
            else:
                # A stream has begun: its last chunks, one last event with the error, the end.
                # After a model that died mid-event, the error starts an event of its own.
                await self.flush()
                separator = b"" if self.at_event_boundary else b"\n\n"
                event = b"event: error\n" if self.anthropic else b""
                self.write(separator + event + b"data: " + body + b"\n\n")
                await self.flush()
                await self.send({"type": "http.response.body", "body": b"", "more_body": False})
