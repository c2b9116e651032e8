"""Placement by memory in the supervisor, with real children and declared sizes: idle models
stop least recently used first, busy ones keep their memory for their time slice and then yield
without losing a request, pinned ones never stop, the longest waiting start goes first, a start
nobody waits for gives its place up, and the status says who waits for what.

The clock is mocked (as in test_supervisor_idle.py): slices of seconds pass in milliseconds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from tests.support.config import echo_cmd, health_server_cmd, make_config
from tests.support.daemon import running_supervisor, supervisor_reaches
from trioserve.config import Config
from trioserve.errors import UpstreamError
from trioserve.supervision.lifecycle import State
from trioserve.supervision.placer import ABANDON_AFTER
from trioserve.supervision.supervisor import Supervisor

MIB = 2**20


@pytest.fixture
def clock() -> MockClock:
    return MockClock(autojump_threshold=0.05)


def memory_config(
    state_dir: Path, models: dict[str, dict[str, Any]], budget: str = "250 MiB", **supervisor: Any
) -> Config:
    """Models running a small HTTP server, each declaring its ``memory``, on a CPU budget."""
    return make_config(
        state_dir,
        {name: {"cmd": health_server_cmd(), **model} for name, model in models.items()},
        supervisor={
            "start_timeout": 3600,
            "health_interval": 3600,
            "max_loaded": 8,
            "memory": {"cpu": budget},
            **supervisor,
        },
    )


async def until(predicate: Callable[[], bool], supervisor: Supervisor) -> None:
    await supervisor_reaches(supervisor, predicate)


@asynccontextmanager
async def started_in_background(supervisor: Supervisor, name: str) -> AsyncIterator[trio.Event]:
    """``ensure_ready(name)`` in a task (a request waiting for its model); the event is set
    once it is ready. The task is cancelled on exit."""
    ready = trio.Event()
    async with trio.open_nursery() as nursery:

        async def start() -> None:
            await supervisor.ensure_ready(name)
            ready.set()

        nursery.start_soon(start)
        yield ready
        nursery.cancel_scope.cancel()


def states(supervisor: Supervisor) -> dict[str, State]:
    return {name: model.state for name, model in supervisor.models.items()}


async def test_idle_models_stop_least_recently_used_first_to_make_room(
    state_dir: Path, clock: MockClock
) -> None:
    sizes = {"memory": "100 MiB"}
    config = memory_config(state_dir, {"a": sizes, "b": sizes, "c": sizes})
    async with running_supervisor(config) as supervisor:
        await supervisor.ensure_ready("a")
        await trio.sleep(5)
        await supervisor.ensure_ready("b")
        await trio.sleep(5)
        async with supervisor.lease("a"):  # a is now the most recently used
            pass
        await trio.sleep(5)
        await supervisor.ensure_ready("c")
        assert states(supervisor) == {"a": State.READY, "b": State.STOPPED, "c": State.READY}
        assert supervisor.devices() == {
            "cpu": {"budget": 250 * MIB, "used": 200 * MIB, "free": 50 * MIB}
        }


async def test_a_busy_model_keeps_its_memory_for_its_slice_then_yields_without_losing_a_request(
    state_dir: Path, clock: MockClock
) -> None:
    sizes = {"memory": "150 MiB"}
    config = memory_config(state_dir, {"a": sizes, "b": sizes}, swap_after=10)
    async with running_supervisor(config) as supervisor:
        a = supervisor.models["a"]
        async with supervisor.lease("a") as lease:
            taken = a.held_since
            async with started_in_background(supervisor, "b") as b_ready:
                await trio.sleep(5)
                assert a.state is State.READY
                waiting = supervisor.status()["b"].waiting_for
                assert waiting == (
                    "waiting for memory: needs 150.0 MiB on cpu, 100.0 MiB free, held by a (busy)"
                )
                await until(lambda: a.state is State.STOPPING, supervisor)
                assert trio.current_time() - taken == pytest.approx(10, abs=0.2)
                # Its request in flight is not cut: the lease still holds, b still waits.
                await trio.sleep(30)
                assert not lease.scope.cancel_called and not b_ready.is_set()
                with pytest.raises(trio.TooSlowError), trio.fail_after(1):
                    await supervisor.ensure_ready("a")  # new requests wait for a's next turn
        # The request ended: a stops, b starts.
        await supervisor.ensure_ready("b")
        assert states(supervisor)["a"] in (State.STOPPED, State.STARTING)


async def test_a_model_used_back_to_back_is_not_taken_as_idle_within_its_slice(
    state_dir: Path, clock: MockClock
) -> None:
    sizes = {"memory": "150 MiB"}
    config = memory_config(state_dir, {"a": sizes, "b": sizes}, swap_after=10)
    async with running_supervisor(config) as supervisor:
        a = supervisor.models["a"]
        await supervisor.ensure_ready("a")
        async with started_in_background(supervisor, "b"):
            # A conversation: a request every half second, never one in flight in between.
            for _ in range(40):
                async with supervisor.lease("a"):
                    await trio.sleep(0.01)
                await trio.sleep(0.5)
                if a.state is not State.READY:
                    break
            # Only the end of its slice, not a pause between requests, made it yield.
            assert a.state is not State.READY
            assert 10 <= trio.current_time() - a.held_since < 11


async def test_pinned_models_never_stop_for_memory(state_dir: Path, clock: MockClock) -> None:
    config = memory_config(
        state_dir,
        {
            "pinned": {"memory": "100 MiB", "pinned": True},
            "a": {"memory": "100 MiB"},
            "b": {"memory": "140 MiB"},
        },
        swap_after=0,
    )
    async with running_supervisor(config) as supervisor:
        await supervisor.ensure_ready("pinned")  # the least recently used
        await trio.sleep(60)
        await supervisor.ensure_ready("a")
        await trio.sleep(60)
        await supervisor.ensure_ready("b")
        assert states(supervisor) == {"pinned": State.READY, "a": State.STOPPED, "b": State.READY}


async def test_a_pinned_model_outlives_its_ttl(state_dir: Path, clock: MockClock) -> None:
    config = memory_config(state_dir, {"p": {"memory": "10 MiB", "pinned": True, "ttl": 60}})
    async with running_supervisor(config) as supervisor:
        await supervisor.ensure_ready("p")
        await trio.sleep(600)
        assert supervisor.models["p"].state is State.READY


async def test_the_start_waiting_longest_goes_first(state_dir: Path, clock: MockClock) -> None:
    sizes = {"memory": "200 MiB"}
    config = memory_config(state_dir, {"a": sizes, "b": sizes, "c": sizes}, swap_after=10)
    async with running_supervisor(config) as supervisor, trio.open_nursery() as nursery:
        a = supervisor.models["a"]
        release = trio.Event()

        async def request_to_a() -> None:
            async with supervisor.lease("a"):
                await release.wait()

        nursery.start_soon(request_to_a)
        await until(lambda: a.state is State.READY, supervisor)
        async with started_in_background(supervisor, "b") as b_ready:
            await trio.sleep(1)
            async with started_in_background(supervisor, "c") as c_ready:
                await trio.sleep(1)
                assert supervisor.models["c"].waiting_for == "waiting for memory behind b"
                await until(lambda: a.state is State.STOPPING, supervisor)
                release.set()
                await b_ready.wait()
                assert not c_ready.is_set()


@asynccontextmanager
async def b_given_up_while_a_is_busy(state_dir: Path) -> AsyncIterator[Supervisor]:
    """a busy for the block; b, which needs a's memory, was asked for by a client that gave up
    after 3 s (b's start still waits for memory, and nobody for it)."""
    sizes = {"memory": "150 MiB"}
    config = memory_config(state_dir, {"a": sizes, "b": sizes}, swap_after=10)
    async with running_supervisor(config) as supervisor, supervisor.lease("a"):
        with trio.move_on_after(3):
            await supervisor.ensure_ready("b")
        assert supervisor.models["b"].state is State.STARTING
        yield supervisor


async def test_a_start_nobody_waits_for_gives_its_place_up(
    state_dir: Path, clock: MockClock
) -> None:
    async with b_given_up_while_a_is_busy(state_dir) as supervisor:
        b = supervisor.models["b"]
        assert b.waiting_for is not None
        await until(lambda: b.state is State.STOPPED, supervisor)
        assert b.waiting_for is None
        # a was never asked to yield, though its slice is long over.
        await trio.sleep(60)
        assert supervisor.models["a"].state is State.READY


async def test_an_abandoned_start_waits_a_moment_for_the_next_request(
    state_dir: Path, clock: MockClock
) -> None:
    async with b_given_up_while_a_is_busy(state_dir) as supervisor:
        b = supervisor.models["b"]
        run = b.run
        await trio.sleep(ABANDON_AFTER / 2)
        async with started_in_background(supervisor, "b") as b_ready:
            await trio.sleep(5)
            assert b.run is run and b.state is State.STARTING  # the same start goes on
        assert not b_ready.is_set()


async def test_a_start_abandoned_while_waiting_raises_for_no_one(
    state_dir: Path, clock: MockClock
) -> None:
    async with b_given_up_while_a_is_busy(state_dir) as supervisor:
        run = supervisor.models["b"].run
        assert run is not None
        await run.stopped.wait()
        with pytest.raises(UpstreamError, match="no request waits for it any more"):
            raise run.attempt.error or AssertionError("no error")


# A start of 1 s on the mocked clock: 40 probes answered 503, one every 25 ms.
SLOW_START = health_server_cmd("--unhealthy-probes", "40")


async def test_a_slow_start_does_not_use_up_the_slice(state_dir: Path, clock: MockClock) -> None:
    config = memory_config(
        state_dir,
        {"a": {"memory": "150 MiB", "cmd": SLOW_START}, "b": {"memory": "150 MiB"}},
        swap_after=0.5,
    )
    async with running_supervisor(config) as supervisor, trio.open_nursery() as nursery:
        a = supervisor.models["a"]
        nursery.start_soon(supervisor.ensure_ready, "a")
        await trio.sleep(0.1)
        async with started_in_background(supervisor, "b"):
            await until(lambda: a.state is State.READY, supervisor)
            assert trio.current_time() >= 1  # longer than its slice
            served = 0
            while a.state is State.READY:  # a conversation with a
                async with supervisor.lease("a"):
                    served += 1
                await trio.sleep(0.1)
            # Its slice counted from its start's end: half a second of requests, not one.
            assert served >= 4
            assert trio.current_time() - a.held_since == pytest.approx(0.5, abs=0.15)


async def test_a_model_ready_with_nobody_waiting_is_taken_as_idle_by_a_waiting_start(
    state_dir: Path, clock: MockClock
) -> None:
    config = memory_config(
        state_dir,
        {"a": {"memory": "150 MiB", "cmd": SLOW_START}, "b": {"memory": "150 MiB"}},
    )
    async with running_supervisor(config) as supervisor:
        with trio.move_on_after(0.3):  # a's only client gives up while it loads
            await supervisor.ensure_ready("a")
        with trio.fail_after(60):
            # b waits while a starts; a's start ends with nobody using it: b takes its memory.
            await supervisor.ensure_ready("b")
        assert supervisor.models["a"].state is State.STOPPED


async def test_a_start_waiting_for_a_gpu_holds_back_no_start_on_the_cpu(
    state_dir: Path, clock: MockClock
) -> None:
    gpu = {"memory": "150 MiB", "devices": ["cuda:0"]}
    config = memory_config(
        state_dir,
        {"g1": gpu, "g2": gpu, "c": {"memory": "100 MiB"}},
        budget="250 MiB",
        memory={"cpu": "250 MiB", "cuda:0": "250 MiB"},
    )
    async with running_supervisor(config) as supervisor:
        # g2 ran once: its host memory is measured, so it needs the cpu budget too.
        await supervisor.load("g2")
        await supervisor.unload("g2")
        assert supervisor.placer.need(supervisor.models["g2"])["cpu"] > 0
        async with supervisor.lease("g1"), started_in_background(supervisor, "g2"):
            await trio.sleep(1)
            assert supervisor.models["g2"].waiting_for is not None
            with trio.fail_after(30):
                await supervisor.ensure_ready("c")  # g2 waits for cuda:0 only


async def test_idle_models_measured_for_real_stop_least_recently_used_first(
    state_dir: Path,
) -> None:
    # Each holds 64 MiB besides its interpreter: ~90 MiB measured. Two fit in 200 MiB.
    hold = {"cmd": echo_cmd("--hold-mib", "64")}
    config = make_config(
        state_dir,
        {name: {**hold, "env": {"NAME": name}} for name in ("x", "y", "z")},
        supervisor={"memory": {"cpu": "200 MiB"}, "max_loaded": 8},
    )
    async with running_supervisor(config) as supervisor:
        for name in ("x", "y", "z"):  # measured once, as a first start does
            await supervisor.load(name)
            await supervisor.unload(name)
        needs = [supervisor.placer.need(supervisor.models[name])["cpu"] for name in "xyz"]
        assert all(64 * MIB < need < 100 * MIB for need in needs), needs
        await supervisor.load("x")
        await supervisor.load("y")
        async with supervisor.lease("x"):  # x is now the most recently used
            pass
        await supervisor.load("z")
        assert states(supervisor) == {"x": State.READY, "y": State.STOPPED, "z": State.READY}


async def test_a_model_just_ready_is_not_evicted_for_a_slot_before_its_waiters_use_it(
    state_dir: Path, clock: MockClock
) -> None:
    config = make_config(
        state_dir,
        {name: {"cmd": health_server_cmd()} for name in ("a", "b")},
        supervisor={"max_loaded": 1, "start_timeout": 3600, "health_interval": 3600},
    )
    async with running_supervisor(config) as supervisor:
        for _ in range(4):  # a and b asked for at once, one slot: one start each per turn
            async with trio.open_nursery() as nursery:
                for name in ("a", "b"):
                    nursery.start_soon(lease_once, supervisor, name)
        spawns = {name: model.spawns for name, model in supervisor.models.items()}
    # Two starts in the first turn, then one a turn: the model left loaded serves first.
    # (Evicting a model that just became ready, before its waiters lease it, made 6 to 8.)
    assert sum(spawns.values()) == 5, spawns


async def lease_once(supervisor: Supervisor, name: str) -> None:
    async with supervisor.lease(name):
        await trio.sleep(0.01)


async def test_a_pinned_model_is_never_evicted_for_a_slot(
    state_dir: Path, clock: MockClock
) -> None:
    config = make_config(
        state_dir,
        {
            "p": {"cmd": health_server_cmd(), "pinned": True},
            "a": {"cmd": health_server_cmd()},
            "c": {"cmd": health_server_cmd()},
        },
        supervisor={"max_loaded": 2, "start_timeout": 3600, "health_interval": 3600},
    )
    async with running_supervisor(config) as supervisor:
        await supervisor.ensure_ready("p")  # the least recently used
        await trio.sleep(60)
        await supervisor.ensure_ready("a")
        await trio.sleep(60)
        await supervisor.ensure_ready("c")
        assert states(supervisor) == {"p": State.READY, "a": State.STOPPED, "c": State.READY}
