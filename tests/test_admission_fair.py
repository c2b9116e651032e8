"""Fair share of a model's slots between users: the admission gate with real trio tasks.

Time is the autojump clock's: a request "runs" for its service time with ``trio.sleep``, and
every arrival is followed by ``wait_all_tasks_blocked()`` so requests arrive in the order sent.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
from trio.testing import wait_all_tasks_blocked

from trioserve.errors import QueueFull
from trioserve.sharing.admission import Admission
from trioserve.sharing.identity import User

SERVICE = 0.5


def user(name: str, **limits: float) -> User:
    return User(key=f"name:{name}", name=name, **limits)  # type: ignore[arg-type]


@dataclass
class Log:
    """What happened to every request: when it got its slot, or that it was refused."""

    granted: list[tuple[str, int, float]] = field(default_factory=list)
    refused: list[tuple[str, int]] = field(default_factory=list)
    cancelled: list[tuple[str, int]] = field(default_factory=list)

    def names(self) -> list[str]:
        return [name for name, _, _ in self.granted]

    def order_of(self, name: str) -> list[int]:
        return [i for who, i, _ in self.granted if who == name]

    def granted_at(self, name: str, i: int) -> float:
        return next(at for who, j, at in self.granted if (who, j) == (name, i))

    def in_order(self, name: str) -> bool:
        """``name``'s requests got their slots in the order sent (several in one instant run
        in trio's order, so compare times)."""
        times = sorted((i, at) for who, i, at in self.granted if who == name)
        return all(a[1] <= b[1] for a, b in itertools.pairwise(times))


async def request(
    admission: Admission,
    who: User,
    i: int,
    log: Log,
    service: float = SERVICE,
    done: trio.Event | None = None,
) -> None:
    """One request: wait for a slot, hold it for ``service`` seconds (or until ``done``)."""
    try:
        async with admission.slot(who):
            log.granted.append((who.name, i, trio.current_time()))
            if done is None:
                await trio.sleep(service)
            else:
                await done.wait()
    except QueueFull:
        log.refused.append((who.name, i))
    except trio.Cancelled:
        log.cancelled.append((who.name, i))
        raise


@dataclass
class Gate:
    """Model "m"'s admission gate, the nursery its requests run in, and what became of them."""

    admission: Admission
    nursery: trio.Nursery
    log: Log = field(default_factory=Log)

    @property
    def counts(self) -> tuple[int, int]:
        """(requests admitted, requests queued)."""
        return self.admission.admitted, self.admission.queued

    async def send(self, who: User, i: int, **kwargs: Any) -> None:
        """Start ``who``'s request ``i`` and return once it has queued or got its slot."""
        self.nursery.start_soon(partial(request, self.admission, who, i, self.log, **kwargs))
        await wait_all_tasks_blocked()

    async def send_many(self, who: User, count: int) -> None:
        """Send ``who``'s requests 0 to ``count - 1``, one after the other."""
        for i in range(count):
            await self.send(who, i)


@asynccontextmanager
async def open_gate(*, max_concurrency: int, max_queue: int) -> AsyncIterator[Gate]:
    """A gate and a nursery for its requests; the block ends once every request has."""
    async with trio.open_nursery() as nursery:
        yield Gate(Admission("m", max_concurrency=max_concurrency, max_queue=max_queue), nursery)


# -- the flood case --------------------------------------------------------------------------------


async def test_flooded_model_serves_another_user_at_the_next_turnover(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_gate(max_concurrency=2, max_queue=128) as gate:
        await gate.send_many(user("alice"), 40)
        await trio.sleep(0.3)
        sent = trio.current_time()
        await gate.send(user("bob"), 0)
        assert gate.admission.queued == 39
    # Both slots free at 0.5 s: one goes to bob, whose one request beats alice's 38 waiting.
    assert gate.log.granted_at("bob", 0) == pytest.approx(SERVICE)
    assert gate.log.granted_at("bob", 0) + SERVICE - sent <= 3 * SERVICE
    assert gate.log.in_order("alice") and len(gate.log.granted) == 41
    assert not gate.log.refused


# -- weights ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("slots", [1, 2, 4])
async def test_weights_one_to_three_share_grants_one_to_three_while_both_wait(
    autojump_clock: trio.testing.MockClock, slots: int
) -> None:
    # 1 and 2 slots too: counting slots in flight alone would split those 1:1.
    light, heavy = user("light", weight=1), user("heavy", weight=3)
    async with open_gate(max_concurrency=slots, max_queue=400) as gate:
        for i in range(100):
            await gate.send(light, i, service=1.0)
            await gate.send(heavy, i, service=1.0)
        # While both still wait: 20 turnovers of all slots.
        await trio.sleep(20.5)
        assert gate.admission.users()["light"]["queued"] > 0
        assert gate.admission.users()["heavy"]["queued"] > 0
        window = Counter(name for name, _, at in gate.log.granted if 0.5 < at < 20.5)
        assert window["light"] + window["heavy"] == 20 * slots
        assert window["light"] == pytest.approx(5 * slots, abs=1)
        gate.nursery.cancel_scope.cancel()


async def test_slot_time_is_shared_not_request_counts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # One user's requests hold a slot 4x as long as the other's: equal weights mean equal
    # slot time, so the short ones get about 4x as many grants.
    admission = Admission("m", max_concurrency=2, max_queue=1000)
    held = {"long": 0.0, "short": 0.0}
    long, short = user("long"), user("short")

    async def timed(who: User, seconds: float) -> None:
        async with admission.slot(who):
            started = trio.current_time()
            try:
                await trio.sleep(seconds)
            finally:
                held[who.name] += trio.current_time() - started

    async with trio.open_nursery() as nursery:
        for _ in range(100):
            nursery.start_soon(timed, long, 2.0)
            for _ in range(4):
                nursery.start_soon(timed, short, 0.5)
        await trio.sleep(80)
        assert admission.users()["long"]["queued"] > 0
        assert admission.users()["short"]["queued"] > 0
        nursery.cancel_scope.cancel()
    assert held["long"] / held["short"] == pytest.approx(1.0, abs=0.05)


async def test_weight_is_read_from_each_slot_call(autojump_clock: trio.testing.MockClock) -> None:
    a, b = user("a"), user("b")
    async with open_gate(max_concurrency=4, max_queue=200) as gate:
        for i in range(30):
            await gate.send(a, i, service=1.0)
            await gate.send(b, i, service=1.0)
        # b's next request carries weight 3 (a config reload): b's waiters share by it too.
        await gate.send(user("b", weight=3), 99, service=1.0)
        await trio.sleep(5.5)
        window = Counter(name for name, _, at in gate.log.granted if 1.5 < at < 5.5)
        assert window == {"a": 4, "b": 12}
        gate.nursery.cancel_scope.cancel()


# -- per-user limits -------------------------------------------------------------------------------


async def test_user_at_its_own_max_concurrency_waits_while_slots_are_free(
    autojump_clock: trio.testing.MockClock,
) -> None:
    capped, other = user("capped", max_concurrency=1), user("other")
    async with open_gate(max_concurrency=4, max_queue=10) as gate:
        await gate.send_many(capped, 3)
        assert gate.counts == (1, 2) and not gate.admission.full
        assert gate.admission.would_wait(capped) and not gate.admission.would_wait(other)
        await gate.send_many(other, 3)
        assert gate.admission.admitted == 4
    assert [at for who, _, at in gate.log.granted if who == "capped"] == [0, SERVICE, 2 * SERVICE]
    assert gate.log.order_of("capped") == [0, 1, 2]


async def test_raised_max_concurrency_of_a_user_applies_to_its_waiters(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_gate(max_concurrency=4, max_queue=10) as gate:
        for i in range(3):
            await gate.send(user("u", max_concurrency=1), i)
        assert gate.admission.admitted == 1
        await gate.send(user("u", max_concurrency=4), 3)
        assert gate.counts == (4, 0)
    assert [at for _, _, at in gate.log.granted] == [0, 0, 0, 0]


async def test_user_beyond_its_own_max_queue_gets_queue_full_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_gate(max_concurrency=1, max_queue=10) as gate:
        # One in flight, two waiting, the fourth refused.
        await gate.send_many(user("small", max_queue=2), 4)
        assert gate.log.refused == [("small", 3)]
        assert trio.current_time() == 0
        # Not the model's queue: another user still queues.
        await gate.send(user("other"), 0)
        assert gate.admission.users() == {
            "small": {"in_flight": 1, "queued": 2},
            "other": {"in_flight": 0, "queued": 1},
        }
    assert gate.log.refused == [("small", 3)]


async def test_full_queue_pushes_out_the_flooders_newest_for_a_newcomer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    flooder, newcomer = user("flooder"), user("newcomer")
    async with open_gate(max_concurrency=1, max_queue=4) as gate:
        # One in flight, four waiting: the model's queue is full.
        await gate.send_many(flooder, 5)
        await gate.send(flooder, 5)
        assert gate.log.refused == [("flooder", 5)]  # the flooder itself is refused
        await gate.send(newcomer, 0)
        assert gate.log.refused == [("flooder", 5), ("flooder", 4)]  # its newest waiting one
        await gate.send(newcomer, 1)
        assert gate.log.refused[-1] == ("flooder", 3)
        # 2 and 2 waiting now: the newcomer no longer has fewer, so its third is refused.
        await gate.send(newcomer, 2)
        assert gate.log.refused[-1] == ("newcomer", 2)
        assert gate.admission.queued == 4
    assert gate.log.order_of("flooder") == [0, 1, 2]
    assert gate.log.order_of("newcomer") == [0, 1]
    assert gate.log.names()[:3] == ["flooder", "newcomer", "flooder"]


# -- order and cancellation ------------------------------------------------------------------------


async def test_each_users_requests_keep_their_order(autojump_clock: trio.testing.MockClock) -> None:
    users = [user(name) for name in "abc"]
    async with open_gate(max_concurrency=2, max_queue=100) as gate:
        for i in range(10):
            for who in users:
                await gate.send(who, i)
    for who in users:
        assert gate.log.order_of(who.name) == list(range(10))
    # Interleaved, not one user's batch after another's.
    assert set(gate.log.names()[:6]) == {"a", "b", "c"}


@pytest.mark.parametrize("cancelled", ["alice", "bob"])
async def test_cancelled_waiter_leaves_the_queue_at_once_and_never_holds_a_slot(
    autojump_clock: trio.testing.MockClock, cancelled: str
) -> None:
    done = trio.Event()
    alice, bob = user("alice"), user("bob")
    async with open_gate(max_concurrency=1, max_queue=10) as gate:
        await gate.send(user("holder"), 0, done=done)
        scopes: dict[str, trio.CancelScope] = {}
        for who in (alice, bob):

            async def waiter(who: User = who) -> None:
                with trio.CancelScope() as scopes[who.name]:
                    await request(gate.admission, who, 1, gate.log)

            gate.nursery.start_soon(waiter)
            await wait_all_tasks_blocked()
        assert gate.admission.queued == 2
        scopes[cancelled].cancel()
        await wait_all_tasks_blocked()
        assert gate.admission.queued == 1
        assert cancelled not in gate.admission.users()
        done.set()
    assert gate.log.cancelled == [(cancelled, 1)]
    assert (cancelled, 1) not in [(name, i) for name, i, _ in gate.log.granted]
    assert gate.counts == (0, 0)


async def test_deadline_of_a_queued_request_of_each_user_frees_its_place(
    autojump_clock: trio.testing.MockClock,
) -> None:
    admission = Admission("m", max_concurrency=1, max_queue=10)
    gone: list[tuple[str, float]] = []
    done = trio.Event()

    async def with_deadline(who: User, deadline: float) -> None:
        with trio.move_on_after(deadline):
            async with admission.slot(who):
                raise AssertionError("a request past its deadline got a slot")
        gone.append((who.name, trio.current_time()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: request(admission, user("holder"), 0, Log(), done=done))
        await wait_all_tasks_blocked()
        nursery.start_soon(with_deadline, user("alice"), 1.0)
        nursery.start_soon(with_deadline, user("bob"), 2.0)
        await trio.sleep(1.5)
        assert gone == [("alice", 1.0)] and admission.queued == 1
        await trio.sleep(1.0)
        assert gone == [("alice", 1.0), ("bob", 2.0)] and admission.queued == 0
        done.set()
    assert (admission.admitted, admission.queued) == (0, 0)


async def test_slot_granted_to_a_task_being_cancelled_goes_to_the_next_waiter(
    autojump_clock: trio.testing.MockClock,
) -> None:
    admission = Admission("m", max_concurrency=1, max_queue=10)
    log = Log()
    release = trio.Event()
    doomed = trio.CancelScope()

    async def holder() -> None:
        async with admission.slot(user("holder")):
            await release.wait()
            # In one step, with no checkpoint between: the cancel is delivered to the
            # waiter (its wait is aborted), then the slot frees and the queue, which still
            # holds that waiter, grants it the slot. It must pass it on.
            doomed.cancel()

    async def first() -> None:
        with doomed:
            await request(admission, user("doomed"), 0, log)

    # A slot kept by the cancelled waiter would leave "next" waiting for ever.
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(holder)
            await wait_all_tasks_blocked()
            nursery.start_soon(first)
            await wait_all_tasks_blocked()
            nursery.start_soon(lambda: request(admission, user("next"), 0, log, service=0))
            await wait_all_tasks_blocked()
            release.set()
    assert log.cancelled == [("doomed", 0)]
    assert log.names() == ["next"]
    assert (admission.admitted, admission.queued) == (0, 0)


# -- runtime limits --------------------------------------------------------------------------------


async def test_reconfigure_up_grants_waiters_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_gate(max_concurrency=1, max_queue=10) as gate:
        await gate.send_many(user("a"), 4)
        gate.admission.reconfigure(3, 10)
        await wait_all_tasks_blocked()
        assert gate.counts == (3, 1)
        assert [at for _, _, at in gate.log.granted] == [0, 0, 0]


async def test_reconfigure_down_lets_in_flight_finish_and_then_holds_the_new_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_gate(max_concurrency=3, max_queue=10) as gate:
        for i, service in enumerate([1.0, 2.0, 3.0, 1.0, 1.0]):
            await gate.send(user("a"), i, service=service)
        gate.admission.reconfigure(1, 1)
        assert gate.counts == (3, 2)  # waiters keep their place
        await gate.send(user("a"), 5)
        assert gate.log.refused == [("a", 5)]  # the lowered max_queue refuses newcomers
        await trio.sleep(2.5)
        assert gate.admission.admitted == 1 and len(gate.log.granted) == 3
    granted = [(i, at) for _, i, at in gate.log.granted]
    assert granted == [(0, 0), (1, 0), (2, 0), (3, 3.0), (4, 4.0)]


# -- without users, and the status counts ---------------------------------------------------------


async def test_slot_without_a_user_is_one_anonymous_fifo(
    autojump_clock: trio.testing.MockClock,
) -> None:
    admission = Admission("m", max_concurrency=1, max_queue=2)
    order: list[int] = []

    async def plain(i: int) -> None:
        try:
            async with admission.slot() as waited:
                order.append(i)
                assert waited == pytest.approx(i * SERVICE)
                await trio.sleep(SERVICE)
        except QueueFull as exc:
            order.append(-i)
            assert exc.status == 429

    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(plain, i)
            await wait_all_tasks_blocked()
        assert admission.users() == {"anonymous": {"in_flight": 1, "queued": 2}}
    assert order == [0, -3, 1, 2]


async def test_anonymous_identities_share_fairly_but_count_as_one_name(
    autojump_clock: trio.testing.MockClock,
) -> None:
    first, second = User(key="addr:10.0.0.1"), User(key="addr:10.0.0.2")
    async with open_gate(max_concurrency=1, max_queue=100) as gate:
        await gate.send_many(first, 5)
        await gate.send(second, 99)
        assert gate.admission.users() == {"anonymous": {"in_flight": 1, "queued": 5}}
    # The second address is not behind the first one's batch.
    assert gate.log.order_of("anonymous")[:2] == [0, 99]
    assert gate.admission.users() == {}
