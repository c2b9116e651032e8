"""The fair share of one model's slots between users: a pure scheduling queue, no trio.

Rules: when a slot frees it goes to the waiting user that has received the least slot time
relative to its weight (ties: the user whose oldest waiting request is oldest); each user's
requests keep their order; a user at its own ``max_concurrency`` waits even when slots are
free. When the model's queue is full, a newcomer whose user has fewer waiting requests than
the user with the most pushes out that user's newest waiting request.

"Slot time received" is start-time fair queueing over the slots: each user has a virtual
finish time that a grant advances by the model's typical service time divided by the user's
weight, corrected by the real time the slot was held when it is released. The user with the
lowest virtual time goes first. Counting slots in flight alone cannot do this: with one slot,
the user whose request just ended has none in flight either, so a flooder would win every tie
on its older requests; and with 2 slots, weights 1:3 could only ever split them 1:1.

A user that starts waiting (after idling, or after its own ``max_concurrency`` held it back)
starts at the queue's virtual time, so time spent away earns no credit.

Costs: arriving behind one's own requests is O(1); a grant or a release is O(log users) (a
heap of eligible users with lazy invalidation, compacted when stale entries pile up); the
push-out victim is found in O(1) (users bucketed by their waiting count, which moves by one).
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from trioserve.sharing.identity import User

__all__ = ["FairQueue", "Refused", "Waiter", "WaiterState"]

# Stale heap entries allowed beyond twice the eligible users before the heap is rebuilt; the
# rebuild is O(users), paid for by at least this many pushes since the last one.
_HEAP_SLACK = 64
# The service time a grant is charged before its real one is known, until one is measured;
# only its ratio to real times matters, and the first real one replaces it.
_FIRST_ESTIMATE = 1.0
# Weight of a new measurement in the model's typical service time (moving average).
_ESTIMATE_ALPHA = 0.1


class Refused(Exception):
    """A request refused at once: its user's own queue, or the model's, is full."""

    def __init__(self, limit: int, *, own: bool) -> None:
        super().__init__(limit, own)
        self.limit = limit
        self.own = own


class WaiterState(enum.Enum):
    WAITING = "waiting"
    GRANTED = "granted"  # holds a slot until released
    REFUSED = "refused"  # pushed out of a full queue; will get 429
    DONE = "done"  # released, or left the queue


@dataclass(eq=False, slots=True)
class _UserState:
    """One user's share of one model; dropped when it has nothing in flight or waiting."""

    # The identity as the latest request passed it: its weight and limits apply.
    spec: User
    in_flight: int = 0
    waiting: OrderedDict[int, Waiter] = field(default_factory=OrderedDict)
    # Virtual time: where this user's slot time so far ends, and the queue's virtual time
    # when it last became eligible (it never starts before that).
    finish: float = 0.0
    floor: float = 0.0
    # The tag of this user's one valid heap entry; 0 when it has none (not eligible).
    tag: int = 0

    @property
    def under_limit(self) -> bool:
        """Room under its own ``max_concurrency`` for one more in flight."""
        limit = self.spec.max_concurrency
        return limit == 0 or self.in_flight < limit

    @property
    def eligible(self) -> bool:
        """May be granted a free slot: has a waiter and room under its own limit."""
        return bool(self.waiting) and self.under_limit


@dataclass(eq=False, slots=True)
class Waiter:
    """One request: waiting, then holding a slot, until released."""

    seq: int
    user: _UserState
    state: WaiterState = WaiterState.WAITING
    # Called (synchronously) when the state leaves WAITING: granted or refused. It must not
    # call back into the queue.
    wake: Callable[[], None] | None = None
    # Set at the grant: when, the user's weight then, and the virtual time charged for it
    # (an estimate, replaced by the real time at the release).
    granted_at: float = 0.0
    weight: float = 1.0
    charged: float = 0.0

    @property
    def refused(self) -> bool:
        return self.state is WaiterState.REFUSED


class _CountBuckets:
    """Users by their number of waiting requests, for "the user with the most" in O(1)."""

    def __init__(self) -> None:
        # count -> users with that count, in the order they reached it.
        self._buckets: dict[int, OrderedDict[_UserState, None]] = {}
        self.top = 0

    def moved(self, user: _UserState, before: int, after: int) -> None:
        if before:
            bucket = self._buckets[before]
            del bucket[user]
            if not bucket:
                del self._buckets[before]
        if after:
            self._buckets.setdefault(after, OrderedDict())[user] = None
        # Counts move by one, so when the top bucket empties the next one down is the top.
        if after > self.top or (before == self.top and before not in self._buckets):
            self.top = after

    def most(self) -> _UserState | None:
        """A user with the most waiting requests: of those, the one that got there last."""
        if not self.top:
            return None
        return next(reversed(self._buckets[self.top]))


class FairQueue:
    """The slots of one model and the users waiting for them.

    Times (``now``) are seconds on any monotonic clock; the trio side passes its own.
    """

    def __init__(self, max_concurrency: int, max_queue: int) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.admitted = 0
        self.queued = 0
        self.service_estimate = _FIRST_ESTIMATE
        self._measured = False
        self._vtime = 0.0  # the virtual start of the latest grant
        self._users: dict[str, _UserState] = {}
        # (virtual start, seq of the oldest waiting request, tag, user): eligible users.
        self._heap: list[tuple[float, int, int, _UserState]] = []
        self._eligible = 0
        self._tags = itertools.count(1)
        self._seqs = itertools.count()
        self._counts = _CountBuckets()

    # -- the operations ------------------------------------------------------------------------

    def arrive(self, user: User, now: float) -> Waiter:
        """A new request of ``user``: granted at once, or queued; raises ``Refused``.

        The user's weight and limits are taken from ``user`` on every call, so a changed
        config applies from the next request on.
        """
        state = self._state(user, now)
        if self.admitted < self.max_concurrency and not state.waiting and state.under_limit:
            # No eligible waiter exists while a slot is free (every change dispatches), so
            # this request takes nobody's turn.
            waiter = Waiter(next(self._seqs), state)
            start = state.finish if state.finish > self._vtime else self._vtime
            self._grant(state, waiter, start, now)
            return waiter
        own_limit = state.spec.max_queue or self.max_queue
        if len(state.waiting) >= own_limit:
            self._forget_if_idle(state)
            raise Refused(own_limit, own=state.spec.max_queue > 0)
        if self.queued >= self.max_queue:
            victim = self._counts.most()
            if victim is None or len(state.waiting) >= len(victim.waiting):
                self._forget_if_idle(state)
                raise Refused(self.max_queue, own=False)
            _, pushed = victim.waiting.popitem(last=True)
            self._left_queue(victim, was_head=not victim.waiting)
            pushed.state = WaiterState.REFUSED
            _wake(pushed)
        waiter = Waiter(next(self._seqs), state)
        state.waiting[waiter.seq] = waiter
        self.queued += 1
        self._counts.moved(state, len(state.waiting) - 1, len(state.waiting))
        if len(state.waiting) == 1:
            self._requeue(state)
        return waiter

    def release(self, waiter: Waiter, now: float) -> None:
        """A granted request is done with its slot: the slot goes to the next waiter."""
        self._release(waiter, now, measured=True)

    def cancel(self, waiter: Waiter, now: float) -> None:
        """The request went away: it leaves the queue, or passes on a slot granted to it in
        the meantime (and is refunded the slot time it did not use)."""
        if waiter.state is WaiterState.GRANTED:
            self._release(waiter, now, measured=False)
        elif waiter.state is WaiterState.WAITING:
            state = waiter.user
            was_head = next(iter(state.waiting)) == waiter.seq
            del state.waiting[waiter.seq]
            waiter.state = WaiterState.DONE
            self._left_queue(state, was_head=was_head)

    def reconfigure(self, max_concurrency: int, max_queue: int, now: float) -> None:
        """New model limits. Requests over a lowered ``max_concurrency`` finish; waiters over
        a lowered ``max_queue`` keep their place (only newcomers are refused)."""
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self._dispatch(now)

    # -- what status pages read ----------------------------------------------------------------

    def per_user(self) -> dict[str, tuple[int, int]]:
        """(in flight, waiting) by display name; O(users), for status, not the hot path."""
        result: dict[str, tuple[int, int]] = {}
        for state in self._users.values():
            name = state.spec.name
            in_flight, waiting = result.get(name, (0, 0))
            result[name] = (in_flight + state.in_flight, waiting + len(state.waiting))
        return result

    def would_wait(self, user: User) -> bool:
        """A request of ``user`` arriving now would queue (or be refused)."""
        if self.admitted >= self.max_concurrency:
            return True
        state = self._users.get(user.key)
        if state is None:
            return False
        limit = user.max_concurrency
        return bool(state.waiting) or (limit > 0 and state.in_flight >= limit)

    # -- internals -----------------------------------------------------------------------------

    def _state(self, user: User, now: float) -> _UserState:
        state = self._users.get(user.key)
        if state is None:
            state = self._users[user.key] = _UserState(user)
        elif state.spec is not user and state.spec != user:
            state.spec = user
            # A raised limit may make its waiters eligible.
            self._requeue(state)
            self._dispatch(now)
        return state

    def _grant(self, state: _UserState, waiter: Waiter, start: float, now: float) -> None:
        if start > self._vtime:
            self._vtime = start
        waiter.weight = state.spec.weight
        waiter.charged = self.service_estimate / waiter.weight
        waiter.granted_at = now
        waiter.state = WaiterState.GRANTED
        state.finish = start + waiter.charged
        state.in_flight += 1
        self.admitted += 1

    def _release(self, waiter: Waiter, now: float, *, measured: bool) -> None:
        if waiter.state is not WaiterState.GRANTED:
            raise RuntimeError(f"release of a waiter that holds no slot ({waiter.state.value})")
        waiter.state = WaiterState.DONE
        state = waiter.user
        held = now - waiter.granted_at if now > waiter.granted_at else 0.0
        if measured:
            self._measure(held)
        # Charge the real slot time instead of the estimate charged at the grant (at the
        # weight of the grant: a weight changed since applies to later grants).
        state.finish += held / waiter.weight - waiter.charged
        state.in_flight -= 1
        self.admitted -= 1
        if state.waiting:
            self._requeue(state)
        else:
            self._forget_if_idle(state)
        self._dispatch(now)

    def _measure(self, held: float) -> None:
        if not self._measured:
            self._measured = True
            self.service_estimate = held
        else:
            self.service_estimate += _ESTIMATE_ALPHA * (held - self.service_estimate)
        # A run of instant answers must not make grants free: keep the estimate positive.
        self.service_estimate = max(self.service_estimate, 1e-6)

    def _left_queue(self, state: _UserState, *, was_head: bool) -> None:
        """Bookkeeping for a waiter just removed from ``state.waiting``."""
        self.queued -= 1
        self._counts.moved(state, len(state.waiting) + 1, len(state.waiting))
        if was_head:
            self._requeue(state)
        self._forget_if_idle(state)

    def _forget_if_idle(self, state: _UserState) -> None:
        # Anonymous users (one per address or `user` string) come and go: keep only the
        # active ones, so memory follows the load, not the history. What a returning user
        # loses is at most one request's slot time of virtual lead.
        if not state.in_flight and not state.waiting:
            self._set_tag(state, 0)
            self._users.pop(state.spec.key, None)

    def _requeue(self, state: _UserState, *, continuing: bool = False) -> None:
        """Give ``state`` one valid heap entry reflecting it now, or none if not eligible.

        ``continuing``: it stays eligible across a grant, so it keeps its floor.
        """
        if not state.eligible:
            self._set_tag(state, 0)
            return
        if not state.tag and not continuing:
            state.floor = self._vtime
        tag = next(self._tags)
        self._set_tag(state, tag)
        start = state.finish if state.finish > state.floor else state.floor
        heapq.heappush(self._heap, (start, next(iter(state.waiting)), tag, state))
        if len(self._heap) > 2 * self._eligible + _HEAP_SLACK:
            self._compact()

    def _set_tag(self, state: _UserState, tag: int) -> None:
        self._eligible += bool(tag) - bool(state.tag)
        state.tag = tag

    def _compact(self) -> None:
        self._heap = [entry for entry in self._heap if entry[2] == entry[3].tag]
        heapq.heapify(self._heap)

    def _dispatch(self, now: float) -> None:
        """Grant free slots to eligible users, least slot time relative to weight first."""
        while self.admitted < self.max_concurrency and self._heap:
            start, _, tag, state = heapq.heappop(self._heap)
            if tag != state.tag:
                continue  # stale: the user changed since this entry was pushed
            self._set_tag(state, 0)
            _, waiter = state.waiting.popitem(last=False)
            self.queued -= 1
            self._counts.moved(state, len(state.waiting) + 1, len(state.waiting))
            self._grant(state, waiter, start, now)
            self._requeue(state, continuing=True)
            _wake(waiter)


def _wake(waiter: Waiter) -> None:
    if waiter.wake is not None:
        waiter.wake()
