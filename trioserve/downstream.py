"""The client side of one relayed request: a single task that does every send.

Why a task of its own: a send must never be cancelled half-way. Hypercorn updates h11's state
before it writes to the socket, so a cancellation landing inside a send (a model that crashed,
a forced unload, a deadline) leaves the connection in a state where any further send raises
inside Hypercorn. The upstream side only appends to a buffer; this task sends, each send in a
shielded scope with its own deadline, and whatever has accumulated goes out in one send — so
under load one send carries many tokens and its cost (Hypercorn, h11, a syscall) is paid once
per batch.
"""

from __future__ import annotations

import contextlib

import trio

from .asgi import Send

__all__ = ["HIGH_WATER", "Downstream"]

# Above this many unsent bytes the upstream reader waits: a slow client slows its own
# upstream read instead of growing our memory.
HIGH_WATER = 1 << 20
# A single send that makes no progress for this long means the client is stuck; the
# response is abandoned.
SEND_LIMIT = 30.0

Headers = list[tuple[bytes, bytes]]


class Downstream:
    def __init__(self, send: Send) -> None:
        self._send = send
        # For the relay's last word (final send, error) once this task is done.
        self.raw_send = send
        self._head: tuple[int, Headers] | None = None
        self._buffer = bytearray()
        self._closed = False
        self._wake_in, self._wake_out = trio.open_memory_channel[None](1)
        self._space = trio.Event()
        self.started = False  # a response head was queued
        self.head_sent = False  # ...and has been sent
        self.status = 0
        self.broken = False  # a send timed out: nothing more may be sent
        self.is_event_stream = False

    def _wake(self) -> None:
        # A full channel already holds a wake-up the sender has not taken yet.
        with contextlib.suppress(trio.WouldBlock):
            self._wake_in.send_nowait(None)

    def start(self, status: int, headers: Headers) -> None:
        """Queue the response head."""
        assert not self.started
        self.started = True
        self.status = status
        self.is_event_stream = any(
            k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers
        )
        self._head = (status, headers)
        self._wake()

    def write(self, data: bytes) -> None:
        """Queue body bytes (never blocks)."""
        if data:
            self._buffer += data
            self._wake()

    @property
    def pending(self) -> int:
        return len(self._buffer)

    async def wait_for_space(self) -> None:
        while len(self._buffer) > HIGH_WATER and not self._closed and not self.broken:
            await self._space.wait()

    def close(self) -> None:
        """No more data: ``run`` returns once everything queued is sent."""
        self._closed = True
        self._wake()

    async def run(self) -> None:
        while not self.broken:
            if self._head is not None:
                status, headers = self._head
                self._head = None
                await self._shielded(
                    {"type": "http.response.start", "status": status, "headers": headers}
                )
                self.head_sent = not self.broken
            elif self._buffer:
                data = bytes(self._buffer)
                self._buffer.clear()
                self._space.set()
                self._space = trio.Event()
                await self._shielded(
                    {"type": "http.response.body", "body": data, "more_body": True}
                )
            elif self._closed:
                return
            else:
                await self._wake_out.receive()

    async def _shielded(self, message: dict[str, object]) -> None:
        with trio.CancelScope(shield=True, deadline=trio.current_time() + SEND_LIMIT) as scope:
            await self._send(message)
        if scope.cancelled_caught:
            self.broken = True
            self._space.set()
