"""The pure scheduling queue, no trio: time is a number the test moves, one slot at a time."""

from __future__ import annotations

import pytest

from trioserve.sharing.fair_queue import FairQueue, Refused, Waiter, WaiterState
from trioserve.sharing.identity import User


class OneSlot:
    """A model with one slot and a fixed service time, driven by hand."""

    def __init__(self, max_queue: int = 1000, service: float = 0.5) -> None:
        self.queue = FairQueue(max_concurrency=1, max_queue=max_queue)
        self.service = service
        self.now = 0.0
        self.holder: Waiter | None = None
        self.served: list[str] = []  # who got the slot, in order

    def send(self, key: str, count: int = 1) -> list[Waiter]:
        waiters = []
        for _ in range(count):
            waiter = self.queue.arrive(User(key=key), self.now)
            waiter.wake = lambda waiter=waiter: self._granted(waiter)
            if waiter.state is WaiterState.GRANTED:
                self._granted(waiter)
            waiters.append(waiter)
        return waiters

    def _granted(self, waiter: Waiter) -> None:
        if waiter.state is WaiterState.GRANTED:
            self.holder = waiter
            self.served.append(waiter.user.spec.key)

    def run(self, seconds: float) -> None:
        """Let ``seconds`` pass: each holder releases one service time after its grant."""
        end = self.now + seconds
        while self.holder is not None and self.holder.granted_at + self.service <= end:
            self.now = self.holder.granted_at + self.service
            holder, self.holder = self.holder, None
            self.queue.release(holder, self.now)
        self.now = end


def test_one_slot_flood_alternates_between_users() -> None:
    # With one slot the flooder's request has just ended when its slot frees, so both users
    # have nothing in flight: the turn must not go to the flooder's older requests.
    model = OneSlot()
    model.send("alice", 40)
    model.run(0.3)
    model.send("bob", 3)
    model.run(3.5)
    assert model.served == ["alice", "bob", "alice", "bob", "alice", "bob", "alice", "alice"]


def test_time_away_earns_no_credit() -> None:
    # bob has had the model to himself for 10 s; alice then arrives with a batch. She is
    # served next, but shares from then on: no 10 s of catching up while bob waits.
    model = OneSlot()
    model.send("bob", 40)
    model.run(9.9)
    before = len(model.served)
    model.send("alice", 10)
    model.run(3.0)
    assert model.served[before:] == ["alice", "bob", "alice", "bob", "alice", "bob"]


def test_model_max_queue_zero_refuses_whoever_would_wait() -> None:
    model = OneSlot(max_queue=0)
    model.send("a")
    with pytest.raises(Refused) as refused:
        model.send("b")
    assert (refused.value.limit, refused.value.own) == (0, False)


def test_refusal_says_whose_limit() -> None:
    queue = FairQueue(max_concurrency=1, max_queue=3)
    queue.arrive(User(key="a"), 0)
    queue.arrive(User(key="a", max_queue=1), 0)
    with pytest.raises(Refused) as own:
        queue.arrive(User(key="a", max_queue=1), 0)
    assert (own.value.limit, own.value.own) == (1, True)
    queue.arrive(User(key="b"), 0)
    queue.arrive(User(key="c"), 0)
    with pytest.raises(Refused) as model:
        queue.arrive(User(key="b"), 0)  # queue full, and b has as many waiting as anyone
    assert (model.value.limit, model.value.own) == (3, False)


def test_push_out_takes_from_whoever_has_most_waiting_as_counts_change() -> None:
    model = OneSlot(max_queue=6)
    model.send("holder")
    a, b = model.send("a", 4), model.send("b", 2)
    model.queue.cancel(a[0], 0)  # a 3 waiting
    b += model.send("b")  # b 3 as well, and got there last; the queue is full
    model.send("c")  # has fewer: pushes out the newest of b, the last to reach the most
    assert [w.refused for w in b] == [False, False, True]
    model.send("d")  # a alone has the most now: a 2, b 2, c 1, d 1
    assert [w.refused for w in a] == [False, False, False, True]
    model.send("e")  # a and b tie again; a got there last
    assert [w.refused for w in a] == [False, False, True, True]
    (late,) = model.send("a")  # a has 1 waiting, b 2: a is admitted, b's newest goes
    assert late.state is WaiterState.WAITING and b[1].refused
    assert model.queue.queued == 6
    # Every key here is anonymous: counted under one name.
    assert model.queue.per_user() == {"anonymous": (1, 6)}


def test_queue_forgets_idle_users_and_keeps_its_heap_bounded() -> None:
    queue = FairQueue(max_concurrency=2, max_queue=10_000)
    granted = [queue.arrive(User(key="h1"), 0), queue.arrive(User(key="h2"), 0)]
    waiters = [queue.arrive(User(key=f"u{i % 100}"), 0) for i in range(1000)]
    woken: list[Waiter] = []
    for waiter in waiters:
        waiter.wake = lambda waiter=waiter: woken.append(waiter)
    for now in range(1, 1001):
        queue.release(granted.pop(0), now)
        granted.extend(woken)
        woken.clear()
        # Stale entries are dropped as they pile up: the heap follows the users, not the
        # number of grants.
        assert len(queue._heap) <= 2 * 100 + 64
    assert (queue.queued, queue.admitted) == (0, 2)
    for held in granted:
        queue.release(held, 1001)
    assert queue.per_user() == {} and queue._heap == []


def test_releasing_twice_is_an_error() -> None:
    queue = FairQueue(max_concurrency=1, max_queue=1)
    waiter = queue.arrive(User(key="a"), 0)
    queue.release(waiter, 1)
    with pytest.raises(RuntimeError, match="holds no slot"):
        queue.release(waiter, 2)
    assert queue.admitted == 0
