"""Ends the admin event streams when the daemon begins to stop.

Hypercorn's graceful shutdown waits for every open response; ``/admin/events`` and
``/admin/activity`` never end by themselves, so one open status page (or ``logs --follow``-like
client) would hold every stop for all of ``shutdown_grace``. Each stream waits through
``StreamEnds.wait``; ``close`` wakes them all, and they end their responses cleanly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import trio

__all__ = ["StreamEnds"]


class StreamEnds:
    def __init__(self) -> None:
        self.closed = False
        self._waiting: set[trio.CancelScope] = set()

    @contextmanager
    def wait(self, timeout: float) -> Iterator[trio.CancelScope]:
        """A scope for one wait of a stream (never spanning its ``yield``): cancelled after
        ``timeout`` or at ``close``, whichever comes first. Check ``closed`` after it."""
        with trio.move_on_after(timeout) as scope:
            if self.closed:
                scope.cancel()
            self._waiting.add(scope)
            try:
                yield scope
            finally:
                self._waiting.discard(scope)

    def close(self) -> None:
        self.closed = True
        for scope in self._waiting:
            scope.cancel()
