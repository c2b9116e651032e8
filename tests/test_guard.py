"""The guard: no model process outlives its daemon (SIGKILL, OOM, crash), identity proven.

A stand-in daemon (tests/support/guard_parent.py) starts a real guard, spawns real children in
their own sessions, tracks them and is SIGKILLed. What is gone, and when, is read from the process
table (pidfds), never from the guard's word. This process adopts the orphans (child subreaper), so
it reaps them, reads how they died, and leaves none behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio

from tests.support.guard_parent import Adopter, Exits, Parent
from trioserve.host.guard import Registry, Tracked, read_proc, stop_all
from trioserve.host.guard_client import Guard, GuardError
from trioserve.host.identity import process_start_time

# The bound: every model process gone within stop_grace + 0.5 s of the daemon's death.
BOUND = 0.5
SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


# What ``settled`` returns: the stand-in daemon, its guard's pid, and the pid of every process
# of every child (grandchildren too).
Settled = tuple[Parent, int, list[int]]


@pytest.fixture
def settled(adopter: Adopter) -> Iterator[Callable[..., Settled]]:
    """``settled(kinds, grace=..., ...)`` starts a stand-in daemon and waits until its guard is
    up and every child is tracked and set up. All are stopped at the end, with every process
    they reported and every orphan adopted meanwhile."""
    started: list[Parent] = []

    def start(kinds: list[str], **options: Any) -> Settled:
        parent = Parent(kinds, **options)
        started.append(parent)
        return (parent, *parent.settle())

    yield start
    pids: list[int] = []
    for parent in started:
        parent.close()
        pids += [e["pid"] for e in parent.events if "pid" in e]
        pids += [e["grandchild"] for e in parent.events if "grandchild" in e]
    adopter.cleanup(pids)


def signalled(status: int | None) -> int | None:
    """The signal that ended a process, from its wait status."""
    assert status is not None, "not reaped by us"
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else None


def assert_gone_in_time(
    pids: list[int], ended: dict[int, float], killed_at: float, grace: float
) -> None:
    """Every one of ``pids`` ended, the last within the bound of the daemon's death."""
    assert set(ended) >= set(pids), "a model process survived"
    assert max(ended[pid] for pid in pids) - killed_at <= grace + BOUND


def assert_death_stops_all(parent: Parent, pids: list[int], guard: int, adopter: Adopter) -> None:
    """SIGKILL the stand-in daemon: every one of ``pids`` ends within the bound, and ``guard``
    exits by itself, done."""
    killed_at, ended = parent.kill_and_watch(
        [*pids, guard], timeout=parent.grace + 5, on_exit=adopter.reap
    )
    assert_gone_in_time(pids, ended, killed_at, parent.grace)
    assert adopter.statuses.get(guard) == 0


def stranger() -> subprocess.Popen[bytes]:
    """A process of ours that no daemon started: no marker, its own session."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIOSERVE_")}
    return subprocess.Popen(SLEEPER, env=env, start_new_session=True)


# -- the daemon SIGKILLed --------------------------------------------------------------------


def test_daemon_sigkill_stops_every_group_within_grace(
    settled: Callable[..., Settled], adopter: Adopter
) -> None:
    # No marker: only what the guard was told (track) can find these.
    grace = 1.0
    parent, guard, pids = settled(
        ["plain", "stubborn", "family", "starting"], grace=grace, marker=False
    )
    kind = {e["pid"]: e["kind"] for e in parent.events if e.get("event") == "child"}
    grandchild = next(e["grandchild"] for e in parent.events if "grandchild" in e)
    killed_at, ended = parent.kill_and_watch(
        [*pids, guard], timeout=grace + 5, on_exit=adopter.reap
    )
    late = {pid: round(ended.get(pid, float("inf")) - killed_at, 3) for pid in pids}
    assert max(late.values()) <= grace + BOUND, late
    for pid in pids:
        if kind.get(pid) == "stubborn" or pid == grandchild:
            # They ignore SIGTERM: SIGKILL, and not before the grace was up.
            assert signalled(adopter.statuses.get(pid)) == signal.SIGKILL
            assert late[pid] >= grace, late
        else:  # plain, the family's leader, the one still starting: SIGTERM was enough
            assert signalled(adopter.statuses.get(pid)) == signal.SIGTERM, kind.get(pid)
    assert adopter.statuses.get(guard) == 0  # it exited by itself, done


def test_children_the_guard_was_never_told_of_are_found_by_their_marker(
    settled: Callable[..., Settled], adopter: Adopter
) -> None:
    # One spawned but never tracked (the daemon died between spawn and track), and one whose
    # worker left its group with setsid(): both still carry the daemon's instance marker.
    parent, guard, pids = settled(["untracked:plain", "escapee"], grace=0.5)
    escaped = next(e["grandchild"] for e in parent.events if "grandchild" in e)
    assert os.getpgid(escaped) == escaped  # it really left the group
    assert_death_stops_all(parent, pids, guard, adopter)


def test_guard_killed_alone_is_replaced_and_a_later_daemon_sigkill_is_covered(
    settled: Callable[..., Settled], adopter: Adopter
) -> None:
    parent, first, pids = settled(["stubborn"], grace=0.5, marker=False)
    os.kill(first, signal.SIGKILL)
    second = parent.event("guard")["pid"]
    assert second != first
    # The new guard learned the old child (re-sent), and learns a new one as usual.
    parent.command("spawn plain")
    parent.event("tracked")
    pids = parent.collect()
    assert len(pids) == 2
    assert_death_stops_all(parent, pids, second, adopter)


def test_guard_ignores_sigint_sighup_sigterm_and_signals_to_the_daemons_group(
    settled: Callable[..., Settled], adopter: Adopter
) -> None:
    grace = 0.5
    parent, guard, pids = settled(["plain"], grace=grace, marker=False)
    with open(f"/proc/{guard}/status") as f:
        ignored = int(next(line for line in f if line.startswith("SigIgn:")).split()[1], 16)
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        assert ignored & (1 << (signum - 1)), signal.Signals(signum).name
        os.kill(guard, signum)
    with Exits([*pids, guard]) as exits:
        # The whole process group of the daemon, as `kill -9 -- -PGID` or a job's end does.
        killed_at = time.monotonic()
        os.killpg(parent.pid, signal.SIGKILL)
        parent.proc.wait()
        exits.wait(grace + 5, on_exit=adopter.reap)
    assert_gone_in_time(pids, exits.ended, killed_at, grace)
    # The very guard we signalled did it and exited by itself (a replacement would not be
    # our child: the stand-in daemon would have reaped the first one).
    assert adopter.statuses.get(guard) == 0


# -- what is never touched -------------------------------------------------------------------


def test_clean_bye_kills_nothing(settled: Callable[..., Settled]) -> None:
    parent, _, pids = settled(["plain", "stubborn"], grace=0.5)
    with Exits(pids) as exits:
        parent.command("bye")
        # It returns only after its guard has exited: nothing can happen after this.
        assert parent.proc.wait(30) == 0
        assert all(exits.alive(pid) for pid in pids), "the guard killed after a bye"


def test_reused_pid_is_never_signalled(settled: Callable[..., Settled], adopter: Adopter) -> None:
    other = stranger()
    try:
        start_time = process_start_time(other.pid)
        assert start_time is not None
        # The pid as a daemon recorded it long ago: same number, another start time.
        parent, guard, pids = settled(
            ["plain"], grace=0.5, marker=False, foreign=[f"{other.pid}:{start_time - 100}"]
        )
        with Exits([other.pid]) as watch_other:
            _, ended = parent.kill_and_watch([*pids, guard], timeout=10, on_exit=adopter.reap)
            assert set(ended) == {*pids, guard}  # the guard acted, and it is done
            assert watch_other.alive(other.pid), "a process with a reused pid was signalled"
        assert adopter.statuses.get(guard) == 0
    finally:
        other.kill()
        other.wait()


def test_second_daemon_is_untouched_by_the_first_ones_death(
    settled: Callable[..., Settled], adopter: Adopter
) -> None:
    first, first_guard, first_pids = settled(["plain", "stubborn"], grace=0.5)
    second, second_guard, second_pids = settled(["plain", "stubborn"], grace=0.5)
    with Exits([*first_pids, first_guard, *second_pids, second_guard]) as exits:
        _, ended = first.kill_and_watch(
            [*first_pids, first_guard], timeout=10, on_exit=adopter.reap
        )
        assert set(ended) == {*first_pids, first_guard}
        # Its guard has exited: whatever it did is done.
        assert all(exits.alive(pid) for pid in [*second_pids, second_guard])
        second.kill()
        exits.wait(10, on_exit=adopter.reap)
        assert set(exits.ended) == {*first_pids, first_guard, *second_pids, second_guard}


# -- the guard's core, in this process -------------------------------------------------------


def _track_line(pid: int, start_time: float, pgid: int | None = None) -> bytes:
    return (
        f'{{"op":"track","pid":{pid},"pgid":{pgid or pid},"start_time":{start_time},"model":"m"}}'
    ).encode()


def test_registry_tracks_only_a_proven_identity() -> None:
    child = subprocess.Popen(SLEEPER, start_new_session=True)
    try:
        start_time = process_start_time(child.pid)
        assert start_time is not None
        registry = Registry(daemon_pgid=os.getpgrp())
        registry.feed(_track_line(child.pid, start_time + 1))  # another start time: reused
        registry.feed(_track_line(child.pid, start_time, pgid=os.getpgrp()))  # not its group
        registry.feed(_track_line(os.getpid(), process_start_time(os.getpid()) or 0))  # ours
        assert registry.tracked == {}
        registry.feed(_track_line(child.pid, start_time))
        assert list(registry.tracked) == [child.pid]
        registry.feed(f'{{"op":"untrack","pid":{child.pid}}}'.encode())
        assert registry.tracked == {}
    finally:
        child.kill()
        child.wait()
    registry.feed(_track_line(child.pid, start_time))  # reaped: nothing to guard
    assert registry.tracked == {}


def test_registry_ignores_lines_that_are_not_messages() -> None:
    registry = Registry()
    registry.feed(b'{"op":"hello","instance":"abc","grace":2.5}')
    for bad in (b"not json", b"[1]", b'{"op":"track","pid":"x"}', b'{"op":"grace","grace":-1}',
                b'{"op":"grace","grace":"NaN"}', b'{"op":"explode"}', b"{}"):  # fmt: skip
        registry.feed(bad)
    assert (registry.instance, registry.grace, registry.bye) == ("abc", 2.5, False)
    registry.feed(b'{"op":"bye"}')
    assert registry.bye


def test_stop_all_never_signals_a_pid_whose_start_time_changed() -> None:
    ours, other = subprocess.Popen(SLEEPER, start_new_session=True), stranger()
    try:
        registry = Registry()
        registry.grace = 5.0
        for proc, shift in ((ours, 0), (other, 1)):  # `other`'s pid was reused since: 1 tick
            seen = read_proc(proc.pid)
            assert seen is not None
            registry.tracked[proc.pid] = Tracked(proc.pid, proc.pid, seen.ticks + shift, "m")
        assert stop_all(registry) == (1, 0)
        assert ours.wait(5) == -signal.SIGTERM
        assert other.poll() is None
    finally:
        for proc in (ours, other):
            proc.kill()
            proc.wait()


def test_stop_all_counts_a_zombie_leader_as_gone() -> None:
    # The dead daemon's children are zombies until init reaps them: no reason to wait.
    child = subprocess.Popen(SLEEPER, start_new_session=True)
    try:
        seen = read_proc(child.pid)
        assert seen is not None
        registry = Registry()
        registry.grace = 30.0
        registry.tracked[child.pid] = Tracked(child.pid, child.pid, seen.ticks, "m")
        with Exits([child.pid]) as exits:
            os.kill(child.pid, signal.SIGKILL)
            exits.wait(10)  # it has exited: a zombie, since we do not reap it yet
        assert (read_proc(child.pid) or seen).zombie
        began = time.monotonic()
        assert stop_all(registry) == (1, 0)
        assert time.monotonic() - began < 5
    finally:
        child.kill()
        child.wait()


# -- the daemon's side -----------------------------------------------------------------------


async def test_guard_that_cannot_start_raises() -> None:
    guard = Guard(instance="x", grace=1, argv=[sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(GuardError, match="exit code 3"):
        await guard.run()


async def test_close_with_children_still_tracked_stops_them() -> None:
    child = await trio.lowlevel.open_process(SLEEPER, start_new_session=True)
    try:
        start_time = await trio.to_thread.run_sync(process_start_time, child.pid)
        assert start_time is not None
        async with trio.open_nursery() as nursery:
            guard = Guard(instance="x", grace=5)
            await nursery.start(guard.run)
            guard.track(child.pid, child.pid, start_time, "m")
            guard.close()  # not reaped, so not untracked: the guard stops it
        assert await child.wait() == -signal.SIGTERM
    finally:
        with trio.CancelScope(shield=True):
            child.kill()
            await child.wait()


async def test_guard_that_stops_reading_is_replaced_without_blocking_the_loop() -> None:
    child = await trio.lowlevel.open_process(SLEEPER, start_new_session=True)
    started: list[int] = []
    restarted = trio.Event()

    def on_start(pid: int) -> None:
        started.append(pid)
        if len(started) == 2:
            restarted.set()

    try:
        start_time = await trio.to_thread.run_sync(process_start_time, child.pid)
        assert start_time is not None
        async with trio.open_nursery() as nursery:
            guard = Guard(instance="x", grace=5, on_start=on_start)
            await nursery.start(guard.run)
            guard.track(child.pid, child.pid, start_time, "m")
            os.kill(started[0], signal.SIGSTOP)  # it reads nothing from now on
            began = time.monotonic()
            for _ in range(30_000):  # ~2.5 MB of lines: more than its pipe holds
                guard.track(child.pid, child.pid, start_time, "m")
            # A write that waited for the pipe would wait forever: the guard reads nothing.
            assert time.monotonic() - began < 10
            with trio.fail_after(30):
                await restarted.wait()
            assert started[1] != started[0]
            assert child.returncode is None
            # The new guard knows the child: a close with it still tracked stops it.
            guard.close()
        assert await child.wait() == -signal.SIGTERM
    finally:
        with trio.CancelScope(shield=True):
            child.kill()
            await child.wait()
