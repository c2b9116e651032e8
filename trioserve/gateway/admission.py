"""Per-model admission: at most ``max_concurrency`` requests upstream, ``max_queue`` waiting."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from trioserve.errors import QueueFull

__all__ = ["Admission"]


class Admission:
    """A FIFO gate. ``trio.Semaphore`` wakes waiters in arrival order (its ParkingLot is FIFO),
    so queued requests proceed as slots free, oldest first."""

    def __init__(self, model: str, max_concurrency: int, max_queue: int) -> None:
        self.model = model
        self.max_queue = max_queue
        self._slots = trio.Semaphore(max_concurrency)
        self.queued = 0
        self.admitted = 0

    @property
    def full(self) -> bool:
        """No slot free: a new request would queue."""
        return self._slots.value == 0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold a slot for the body; raises ``QueueFull`` at once when the queue is full.

        A waiter that is cancelled (client gone, deadline) leaves the queue immediately.
        """
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            if self.queued >= self.max_queue:
                raise QueueFull(self.model, self.max_queue) from None
            self.queued += 1
            try:
                await self._slots.acquire()
            finally:
                self.queued -= 1
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1
            self._slots.release()
