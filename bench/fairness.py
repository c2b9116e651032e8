"""Fair share of a model's slots between users, measured on the admission gate itself.

Run with ``.venv/bin/python bench/fairness.py`` (``--seconds 10`` for a quicker run). No HTTP:
requests are trio tasks that take a slot from ``trioserve.sharing.admission.Admission`` and
hold it for a simulated service time (``trio.sleep``, real clock). Four figures:

1. **flood**: user A sends 40 requests to a model with 2 slots (0.5 s each); user B's one
   request, sent 0.3 s later, finishes after how many service times? (FIFO: 20.4; goal <= 3.)
   Also with 1 slot.
2. **equal demand**: 4 users, each keeping 2x the slots busy for ``--seconds`` (after a warm-up
   of 4 service times): Jain's fairness index of the slot-seconds each received (1.0 = equal;
   goal >= 0.99).
3. **weights 1:2:4**: the same with 3 users of those weights: each one's share of the
   slot-seconds against its due (goal: within 5 %), with 2 and 8 slots (where slots cannot be
   split 1:2:4 at any one moment, so only shares over time can be fair).
4. **scheduling cost**: CPU time of the queue's operations per request (arrive + grant +
   release, the pure ``FairQueue``) with nobody waiting, with 1,000 requests waiting from 100
   users and 10,000 from 1,000; and through trio, ``slot()`` enter/exit per request uncontended
   and per slot turnover with 1,000 waiting from 100 users vs 10 from 1 user (these include
   waking the waiter's task).

Service times in (2) and (3) vary (uniform 0.5x to 1.5x of ``--service``), so users do not
move in lockstep. Exit status 1 when a goal is missed.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import trio
import trio.testing

from trioserve.sharing.admission import Admission
from trioserve.sharing.fair_queue import FairQueue, Waiter, WaiterState
from trioserve.sharing.identity import User

# Service times before the share measurements start counting.
WARM_UP = 4


def user(name: str, weight: float = 1.0) -> User:
    return User(key=f"name:{name}", name=name, weight=weight)


# -- 1. flood -----------------------------------------------------------------------------------


async def flood(slots: int, service: float) -> float:
    """B's latency, in service times."""
    admission = Admission("m", slots, 1000)
    alice, bob = user("alice"), user("bob")
    latency = 0.0

    async def one(who: User) -> None:
        async with admission.slot(who):
            await trio.sleep(service)

    async def bobs() -> None:
        nonlocal latency
        await trio.sleep(0.6 * service)
        sent = trio.current_time()
        await one(bob)
        latency = trio.current_time() - sent

    async with trio.open_nursery() as nursery:
        for _ in range(40):
            nursery.start_soon(one, alice)
            await trio.testing.wait_all_tasks_blocked()
        await bobs()
        nursery.cancel_scope.cancel()
    return latency / service


# -- 2 and 3. shares under steady demand ---------------------------------------------------------


async def shares(
    users: list[User], slots: int, seconds: float, service: float, seed: int
) -> dict[str, float]:
    """Slot-seconds each user received while all of them kept 2x the slots asked for.

    Counted from ``WARM_UP`` service times on: the first user to start takes every free slot
    before the others ask (as it should: nobody else was waiting), which is not the share
    under contention this measures.
    """
    admission = Admission("m", slots, 10_000)
    held: dict[str, float] = dict.fromkeys([who.name for who in users], 0.0)
    rng = random.Random(seed)
    begin = trio.current_time() + WARM_UP * service
    end = begin + seconds

    async def worker(who: User) -> None:
        while True:
            async with admission.slot(who):
                started = trio.current_time()
                try:
                    await trio.sleep(service * rng.uniform(0.5, 1.5))
                finally:
                    stopped = min(trio.current_time(), end)
                    held[who.name] += max(0.0, stopped - max(started, begin))

    async with trio.open_nursery() as nursery:
        for who in users:
            for _ in range(2 * slots):
                nursery.start_soon(worker, who)
        await trio.sleep_until(end)
        nursery.cancel_scope.cancel()
    return {who.name: held[who.name] for who in users}


def jain(values: list[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


# -- 4. scheduling cost -------------------------------------------------------------------------


def queue_cost(waiting: int, users: int, rounds: int) -> tuple[float, float]:
    """p50 and mean CPU microseconds of arrive + the grant it later gets + release, per
    request, with ``waiting`` requests from ``users`` users queued throughout."""
    slots = 8
    queue = FairQueue(slots, waiting + slots + 1)
    granted: list[Waiter] = []

    def wake(waiter: Waiter) -> None:
        waiter.wake = lambda: granted.append(waiter)

    holders = [queue.arrive(User(key="holder"), 0.0) for _ in range(slots)]
    for i in range(waiting):
        wake(queue.arrive(User(key=f"u{i % users}"), 0.0))
    costs: list[float] = []
    clock = time.perf_counter
    now = 0.0
    for i in range(rounds):
        now += 0.001
        # One slot turns over: the holder releases (granting the next waiter), and a new
        # request arrives to keep the queue as long as it was.
        held = holders.pop(0) if holders else granted.pop(0)
        who = User(key=f"u{i % users}") if waiting else User(key="holder")
        start = clock()
        queue.release(held, now)
        waiter = queue.arrive(who, now)
        costs.append(clock() - start)
        if waiter.state is WaiterState.GRANTED:
            holders.append(waiter)
        else:
            wake(waiter)
    micro = [c * 1e6 for c in costs]
    return statistics.median(micro), statistics.fmean(micro)


async def uncontended_cost(rounds: int) -> float:
    """Microseconds per ``slot()`` enter/exit with nobody waiting."""
    admission = Admission("m", 8, 128)
    who = user("solo")
    start = time.perf_counter()
    for _ in range(rounds):
        async with admission.slot(who):
            pass
    return (time.perf_counter() - start) / rounds * 1e6


async def turnover_cost(waiting: int, users: int, seconds: float) -> float:
    """Microseconds per slot turnover through trio: ``waiting`` tasks from ``users`` users
    queue again as soon as they are done, so the queue stays that long."""
    admission = Admission("m", 8, waiting + 8)
    turnovers = 0

    async def worker(who: User) -> None:
        nonlocal turnovers
        while True:
            async with admission.slot(who):
                turnovers += 1
                # Hold the slot across one scheduling pass, as a real request would.
                await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        for i in range(waiting + 8):
            nursery.start_soon(worker, user(f"u{i % users}"))
        await trio.sleep(0.2)  # let the queue fill
        turnovers = 0
        start = time.perf_counter()
        await trio.sleep(seconds)
        elapsed = time.perf_counter() - start
        count = turnovers
        nursery.cancel_scope.cancel()
    return elapsed / count * 1e6


# -- main ---------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> int:
    ok = True
    print("1. flood: 40 requests of A, then 1 of B 0.3 s later; B's latency / service time")
    for slots in (2, 1):
        ratio = await flood(slots, args.service)
        ok &= ratio <= 3
        print(f"   {slots} slot(s): {ratio:.2f}  (FIFO would be {40 / slots + 1 - 0.6:.1f})")

    print(f"2. equal demand, 4 users, 4 slots, {args.seconds:g} s")
    four = [user(f"u{i}") for i in range(4)]
    got = await shares(four, 4, args.seconds, args.service, args.seed)
    index = jain(list(got.values()))
    ok &= index >= 0.99
    listed = ", ".join(f"{name} {value:.1f}" for name, value in got.items())
    print(f"   slot-seconds: {listed}\n   Jain's index: {index:.5f}  (goal >= 0.99)")

    print(f"3. weights 1:2:4, {args.seconds:g} s each")
    weighted = [user("w1", 1), user("w2", 2), user("w4", 4)]
    for slots in (2, 8):
        got = await shares(weighted, slots, args.seconds, args.service, args.seed)
        total = sum(got.values())
        worst = 0.0
        parts = []
        for who in weighted:
            share = got[who.name] / total
            due = who.weight / 7
            worst = max(worst, abs(share - due) / due)
            parts.append(f"{who.name} {share:.3f} (due {due:.3f})")
        ok &= worst <= 0.05
        print(f"   {slots} slots: {', '.join(parts)}; worst {worst:.1%} off  (goal <= 5 %)")

    print("4. scheduling cost")
    for waiting, users in ((0, 1), (1000, 100), (10_000, 1000)):
        p50, mean = queue_cost(waiting, users, args.rounds)
        print(
            f"   queue ops per request, {waiting:>6} waiting from {users:>4} users: "
            f"p50 {p50:.2f} us, mean {mean:.2f} us"
        )
    print(f"   slot() enter/exit, nobody waiting: {await uncontended_cost(args.rounds):.2f} us")
    for waiting, users in ((10, 1), (1000, 100)):
        cost = await turnover_cost(waiting, users, args.turnover_seconds)
        print(
            f"   slot turnover through trio, {waiting:>4} waiting from {users:>3} users: "
            f"{cost:.2f} us"
        )
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="per share measurement")
    parser.add_argument("--service", type=float, default=0.5, help="mean service time, s")
    parser.add_argument("--rounds", type=int, default=20_000, help="operations timed in (4)")
    parser.add_argument("--turnover-seconds", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    return trio.run(run, args)


if __name__ == "__main__":
    sys.exit(main())
