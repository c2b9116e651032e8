"""Per-model admission: at most ``max_concurrency`` requests upstream, ``max_queue`` waiting,
free slots shared fairly between users (the rules are in ``fair_queue.py``).

No task per waiting request: a waiter parks on its own ``trio.Event``, which the queue sets
when it grants the waiter a slot or pushes it out of a full queue.
"""

from __future__ import annotations

import trio

from trioserve.errors import QueueFull
from trioserve.sharing.fair_queue import FairQueue, Refused, Waiter, WaiterState
from trioserve.sharing.identity import ANONYMOUS, User

__all__ = ["Admission"]


class Admission:
    """The gate in front of one model."""

    def __init__(self, model: str, max_concurrency: int, max_queue: int) -> None:
        self.model = model
        self._queue = FairQueue(max_concurrency, max_queue)
        self._departure: trio.Event | None = None

    def departure(self) -> trio.Event:
        """An event set when a request next leaves: its slot released, or it gave up or was
        pushed out while waiting. For a retiring model, which stops once nothing is left."""
        if self._departure is None:
            self._departure = trio.Event()
        return self._departure

    def _departed(self) -> None:
        # On every request's path: one attribute test unless someone waits.
        if self._departure is not None:
            self._departure.set()
            self._departure = None

    @property
    def full(self) -> bool:
        """No slot free: a new request would queue."""
        return self._queue.admitted >= self._queue.max_concurrency

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return self._queue.queued

    @property
    def admitted(self) -> int:
        """Requests holding a slot."""
        return self._queue.admitted

    def would_wait(self, user: User) -> bool:
        """A request of ``user`` would queue now: no slot free, or ``user`` is at its own
        ``max_concurrency``, or has requests waiting already."""
        return self._queue.would_wait(user)

    def reconfigure(self, max_concurrency: int, max_queue: int) -> None:
        """New limits (a config reload). Requests in flight over a lowered
        ``max_concurrency`` finish; waiters over a lowered ``max_queue`` keep their place."""
        self._queue.reconfigure(max_concurrency, max_queue, trio.current_time())

    def users(self) -> dict[str, dict[str, int]]:
        """``{name: {"in_flight", "queued"}}`` on this model, anonymous users under
        ``"anonymous"``; O(active users), for status pages."""
        return {
            name: {"in_flight": in_flight, "queued": queued}
            for name, (in_flight, queued) in self._queue.per_user().items()
        }

    def slot(self, user: User = ANONYMOUS) -> _Slot:
        """``async with admission.slot(user) as waited:`` holds a slot for the body;
        ``waited`` is the seconds spent waiting for it.

        Raises ``QueueFull`` at once when ``user``'s queue or the model's is full, and later
        when this request is pushed out of a full queue by another user's. A waiter that is
        cancelled (client gone, deadline) leaves the queue at once; a slot granted to it in
        the same moment goes to the next waiter.
        """
        return _Slot(self, user)


class _Slot:
    """One request's hold on a slot. A class, not ``@asynccontextmanager``: this is on every
    request's path, and a generator-based manager costs a few microseconds more."""

    __slots__ = ("_admission", "_user", "_waiter")

    def __init__(self, admission: Admission, user: User) -> None:
        self._admission = admission
        self._user = user
        self._waiter: Waiter | None = None

    async def __aenter__(self) -> float:
        admission = self._admission
        queue = admission._queue
        arrived = trio.current_time()
        try:
            waiter = self._waiter = queue.arrive(self._user, arrived)
        except Refused as exc:
            raise QueueFull(admission.model, exc.limit) from None
        if waiter.state is WaiterState.WAITING:
            granted = trio.Event()
            waiter.wake = granted.set
            try:
                await granted.wait()
            except BaseException:
                # Cancelled (or KeyboardInterrupt): leave the queue, or hand on the slot the
                # queue granted after the cancel was delivered but before this task ran.
                queue.cancel(waiter, trio.current_time())
                admission._departed()
                raise
            if waiter.refused:
                admission._departed()
                raise QueueFull(admission.model, queue.max_queue)
        return waiter.granted_at - arrived

    async def __aexit__(self, *exc_info: object) -> None:
        # Set: __aexit__ runs only after __aenter__ returned.
        if self._waiter is not None:
            admission = self._admission
            admission._queue.release(self._waiter, trio.current_time())
            admission._departed()
