"""A broadcast of lifecycle events to any number of listeners (``/admin/events``, the CLI)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from trioserve.supervision.lifecycle import Transition

__all__ = ["EventBus"]


class EventBus:
    """Fan-out of ``Transition`` events. A listener that falls far behind is dropped, never
    allowed to slow the supervisor down."""

    def __init__(self, buffer: int = 256) -> None:
        self._buffer = buffer
        self._listeners: set[trio.MemorySendChannel[Transition]] = set()

    def publish(self, event: Transition) -> None:
        for send in list(self._listeners):
            try:
                send.send_nowait(event)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                self._listeners.discard(send)
                send.close()

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[trio.MemoryReceiveChannel[Transition]]:
        send, receive = trio.open_memory_channel[Transition](self._buffer)
        self._listeners.add(send)
        try:
            async with receive:
                yield receive
        finally:
            self._listeners.discard(send)
            send.close()

    def close(self) -> None:
        for send in self._listeners:
            send.close()
        self._listeners.clear()
