"""Idle models: TTL stops a model only once no lease has held it for ttl seconds; max_loaded
evicts the least recently used idle model, never one with a lease, and waits while all are busy.

The clock is mocked: TTLs of minutes pass in milliseconds. The children are real HTTP servers
(``HEALTH_SERVER``), so the clock autojumps only after 50 ms of real idleness: with a threshold
of 0 it would jump while a child is starting, in real time. Health checks and start timeouts
are set far beyond anything these tests wait for, so a jump only ever lands on a TTL, a stop
grace or a test's own sleep.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from tests.support.config import health_server_cmd, make_config
from tests.support.daemon import running_supervisor
from trioserve.config import Config
from trioserve.errors import UpstreamError
from trioserve.supervision.lifecycle import State, Transition
from trioserve.supervision.supervisor import Supervisor


@pytest.fixture
def clock() -> MockClock:
    return MockClock(autojump_threshold=0.05)


def idle_config(state_dir: Path, models: dict[str, dict[str, Any]], **supervisor: Any) -> Config:
    return make_config(
        state_dir,
        {name: {"cmd": health_server_cmd(), **model} for name, model in models.items()},
        supervisor={"start_timeout": 3600, "health_interval": 3600, **supervisor},
    )


async def stopped_event(supervisor: Supervisor, name: str) -> Transition:
    async with supervisor.events.subscribe() as events:
        async for event in events:
            if event.model == name and event.to_state is State.STOPPING:
                return event
    raise AssertionError("no stop")


async def test_ttl_stops_an_idle_model_after_ttl(state_dir: Path, clock: MockClock) -> None:
    config = idle_config(state_dir, {"m": {"ttl": 60}})
    async with running_supervisor(config) as supervisor:
        await supervisor.ensure_ready("m")
        ready_at = supervisor.models["m"].last_used_clock
        event = await stopped_event(supervisor, "m")
        idle = trio.current_time() - ready_at
        assert 60 <= idle < 61
        assert event.reason == "idle for 60s (ttl)"


async def test_ttl_counts_from_the_end_of_the_last_lease(state_dir: Path, clock: MockClock) -> None:
    config = idle_config(state_dir, {"m": {"ttl": 60}})
    async with running_supervisor(config) as supervisor:
        model = supervisor.models["m"]
        async with supervisor.lease("m"):
            pid = supervisor.status()["m"].pid
            await trio.sleep(600)  # ten TTLs with a request in flight
            assert model.state is State.READY
        released = trio.current_time()
        await trio.sleep(59)
        assert model.state is State.READY and supervisor.status()["m"].pid == pid
        await stopped_event(supervisor, "m")
        assert 60 <= trio.current_time() - released < 61


async def test_ttl_zero_never_stops(state_dir: Path, clock: MockClock) -> None:
    config = idle_config(state_dir, {"m": {"ttl": 0}})
    async with running_supervisor(config) as supervisor:
        await supervisor.ensure_ready("m")
        await trio.sleep(3000)  # ten default TTLs
        assert supervisor.models["m"].state is State.READY


async def test_lru_idle_model_is_evicted_first(state_dir: Path, clock: MockClock) -> None:
    config = idle_config(state_dir, {"a": {}, "b": {}, "c": {}}, max_loaded=2)
    async with running_supervisor(config) as supervisor:
        await supervisor.ensure_ready("a")
        await trio.sleep(1)
        await supervisor.ensure_ready("b")
        await trio.sleep(1)
        async with supervisor.lease("a"):  # a is now the most recently used
            pass
        await supervisor.ensure_ready("c")
        states = {name: model.state for name, model in supervisor.models.items()}
    assert states == {"a": State.READY, "b": State.STOPPED, "c": State.READY}


async def test_eviction_never_stops_a_model_with_a_lease(state_dir: Path, clock: MockClock) -> None:
    config = idle_config(state_dir, {"a": {}, "b": {}, "c": {}}, max_loaded=2)
    # a is the least recently used, but busy.
    async with running_supervisor(config) as supervisor, supervisor.lease("a"):
        await trio.sleep(1)
        await supervisor.ensure_ready("b")
        await trio.sleep(1)
        await supervisor.ensure_ready("c")
        states = {name: model.state for name, model in supervisor.models.items()}
    assert states == {"a": State.READY, "b": State.STOPPED, "c": State.READY}


@pytest.mark.parametrize("a_frees_it_by", ["ending-its-lease", "crashing"])
async def test_start_waits_while_every_loaded_model_is_busy(
    state_dir: Path, clock: MockClock, a_frees_it_by: str
) -> None:
    crashing = a_frees_it_by == "crashing"
    config = idle_config(state_dir, {"a": {}, "b": {}}, max_loaded=1)
    async with running_supervisor(config) as supervisor:
        a, b = supervisor.models["a"], supervisor.models["b"]
        release = trio.Event()
        lost: list[UpstreamError] = []
        async with trio.open_nursery() as nursery:
            await nursery.start(_hold_lease, supervisor, "a", release, lost)
            nursery.start_soon(supervisor.ensure_ready, "b")
            await trio.sleep(600)
            # b waits for room; it has not been spawned, a was not touched.
            assert b.state is State.STARTING and b.spawns == 0
            assert a.state is State.READY
            if crashing:
                assert a.process is not None
                a.process.kill_now()
            else:
                release.set()
        # Idle, a made room for b (eviction); crashed, its slot went to b.
        assert a.state is (State.FAILED if crashing else State.STOPPED)
        assert len(lost) == (1 if crashing else 0)
        assert b.state is State.READY


async def _hold_lease(
    supervisor: Supervisor,
    name: str,
    release: trio.Event,
    lost: list[UpstreamError],
    *,
    task_status: trio.TaskStatus[None],
) -> None:
    """Hold a lease on ``name`` until ``release`` is set or the lease is lost (into ``lost``)."""
    try:
        async with supervisor.lease(name):
            task_status.started()
            await release.wait()
    except UpstreamError as error:
        lost.append(error)
