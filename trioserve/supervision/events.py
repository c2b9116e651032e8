"""A broadcast of lifecycle events to any number of listeners.

Two kinds of listener, because losing one means different things:

- ``subscribe()``, for outside clients (``/admin/events``): a bounded channel. A client that
  falls ``buffer`` events behind is dropped: its channel closes, so its stream visibly ends.
  A slow client can never slow the supervisor down.
- ``watch()``, for the daemon's own consumers (the idle-connection sweep, systemd's status
  line): never dropped. One that falls behind loses the events it missed and reads ``LAGGED``
  once in their place, then the newer events: it resynchronises from the current state, which
  is all these consumers need.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

import trio

from trioserve.supervision.lifecycle import Transition

__all__ = ["LAGGED", "EventBus", "EventWatch", "Lagged"]


class Lagged(enum.Enum):
    """Stands for events a watch missed: read the current state instead."""

    LAGGED = "lagged"


LAGGED: Final = Lagged.LAGGED


class EventWatch:
    """An internal listener's view of the bus: ``async for event in watch`` yields each
    ``Transition``, or ``LAGGED`` where events were missed; it ends when the bus closes."""

    def __init__(self, buffer: int) -> None:
        self._buffer = buffer
        self._pending: deque[Transition] = deque()
        self._lagged = False
        self._closed = False
        self._wakeup = trio.Event()

    def _push(self, event: Transition) -> None:
        if len(self._pending) >= self._buffer:
            # Bounded memory: what was missed is replaced by one marker.
            self._pending.clear()
            self._lagged = True
        else:
            self._pending.append(event)
        self._wakeup.set()

    def _close(self) -> None:
        self._closed = True
        self._wakeup.set()

    def __aiter__(self) -> EventWatch:
        return self

    async def __anext__(self) -> Transition | Lagged:
        while True:
            if self._lagged:
                self._lagged = False
                return LAGGED
            if self._pending:
                return self._pending.popleft()
            if self._closed:
                raise StopAsyncIteration
            self._wakeup = trio.Event()
            await self._wakeup.wait()


class EventBus:
    """Fan-out of ``Transition`` events; publishing never waits."""

    def __init__(self, buffer: int = 256) -> None:
        self._buffer = buffer
        self._listeners: set[trio.MemorySendChannel[Transition]] = set()
        self._watches: set[EventWatch] = set()

    def publish(self, event: Transition) -> None:
        for watch in self._watches:
            watch._push(event)
        for send in list(self._listeners):
            try:
                send.send_nowait(event)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                self._listeners.discard(send)
                send.close()

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[trio.MemoryReceiveChannel[Transition]]:
        """An outside client's channel; closed (``EndOfChannel``) if it falls behind."""
        send, receive = trio.open_memory_channel[Transition](self._buffer)
        self._listeners.add(send)
        try:
            async with receive:
                yield receive
        finally:
            self._listeners.discard(send)
            send.close()

    @asynccontextmanager
    async def watch(self) -> AsyncIterator[EventWatch]:
        """An internal consumer's watch: never dropped (see the module's docstring)."""
        watch = EventWatch(self._buffer)
        self._watches.add(watch)
        try:
            yield watch
        finally:
            # Read after its block, a watch ends rather than waiting for what never comes.
            watch._close()
            self._watches.discard(watch)

    def close(self) -> None:
        for send in self._listeners:
            send.close()
        self._listeners.clear()
        for watch in self._watches:
            watch._close()
