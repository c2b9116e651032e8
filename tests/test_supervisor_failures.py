"""Faults: crashes while ready, repeated failed starts and their cooldown, wedged children,
and forced unloads of models stuck starting or stopping."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import trio
from trio.testing import MockClock

import trioserve.supervision.run
from tests.support.config import SpawnCounter, echo_cmd, health_server_cmd, make_config
from tests.support.daemon import running_daemon, running_supervisor
from trioserve.config import Config
from trioserve.errors import ModelUnavailable, UpstreamError
from trioserve.host.store import StateStore, StoreWriter
from trioserve.supervision.lifecycle import State, Transition
from trioserve.supervision.process import ChildProcess
from trioserve.supervision.supervisor import Supervisor

CHAT = {"model": "m", "messages": [{"role": "user", "content": "a b c"}]}


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@asynccontextmanager
async def transitions(
    supervisor: Supervisor,
) -> AsyncIterator[trio.MemoryReceiveChannel[Transition]]:
    async with supervisor.events.subscribe() as events:
        yield events


async def next_event(events: trio.MemoryReceiveChannel[Transition], to: State) -> Transition:
    async for event in events:
        if event.to_state is to:
            return event
    raise AssertionError(f"the event stream ended before a transition to {to}")


async def spawned(supervisor: Supervisor, name: str) -> ChildProcess:
    """``name``'s process once it is spawned: the supervisor's ``on_spawn`` hook says when."""
    model, spawn = supervisor.models[name], trio.Event()
    supervisor.on_spawn = lambda spawned_name: spawn.set() if spawned_name == name else None
    with trio.fail_after(10):
        while model.process is None:
            await spawn.wait()
    return model.process


# -- crash while ready -------------------------------------------------------------------------


async def test_crash_while_ready_fails_the_lease_at_once_and_next_request_restarts(
    state_dir: Path, spawns: SpawnCounter
) -> None:
    cmd = spawns.cmd("m", "--crash-after", "2", "--tokens", "8", "--token-delay", "0.01")
    config = make_config(state_dir, {"m": {"cmd": cmd}})
    async with running_supervisor(config) as supervisor:
        with pytest.raises(UpstreamError) as lost:
            async with supervisor.lease("m") as lease:
                async with httpx.AsyncClient(base_url=lease.endpoint.base_url) as client:
                    with pytest.raises(httpx.TransportError):
                        async with client.stream(
                            "POST", "/v1/chat/completions", json={**CHAT, "stream": True}
                        ) as response:
                            async for _ in response.aiter_raw():
                                pass
                crashed = trio.current_time()
                # A request that is not reading from the backend right now (queued behind a
                # lock, waiting on a slow client) learns of the crash from its lease.
                with trio.fail_after(30):
                    await trio.sleep_forever()
        noticed = trio.current_time() - crashed
        assert noticed < 1.0
        assert lost.value.status == 502
        assert "exited with code 1 while serving" in lost.value.message
        model = supervisor.models["m"]
        assert model.state is State.FAILED
        await supervisor.ensure_ready("m")
        assert model.state is State.READY
        assert model.lifecycle.restarts == 1
    assert spawns.count("m") == 2


async def test_crash_mid_request_gives_502_through_the_gateway(state_dir: Path) -> None:
    # One streamed request crashes the backend while a slow plain request is in flight.
    cmd = echo_cmd("--crash-after", "1", "--response-delay", "20")
    config = make_config(state_dir, {"m": {"cmd": cmd}})
    async with running_daemon(config, admin=True) as (info, client):
        assert (await client.post("/admin/models/m/load")).status_code == 200
        model = info.supervisor.models["m"]
        async with transitions(info.supervisor) as events, trio.open_nursery() as nursery:
            slow: list[httpx.Response] = []

            async def slow_request() -> None:
                slow.append(await client.post("/v1/chat/completions", json=CHAT))

            nursery.start_soon(slow_request)
            # Once it holds the model, it is on its way to the backend (which keeps it 20 s).
            with trio.fail_after(10):
                while not model.leases:
                    await model.lease_changed.wait()
            crash = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
            with trio.fail_after(1):
                failed = await next_event(events, State.FAILED)
        assert "exited with code 1 while serving" in failed.reason
        assert slow[0].status_code == 502
        assert slow[0].json()["error"]["code"] == "upstream_error"
        assert crash.status_code in (200, 502)  # 200 once the stream had begun
        # The next request starts it again.
        assert (await client.post("/admin/models/m/load")).status_code == 200
        status = (await client.get("/admin/status")).json()["models"]["m"]
        assert status["state"] == "ready" and status["restarts"] == 1


# -- repeated failed starts --------------------------------------------------------------------


def failing_config(
    state_dir: Path, spawns: SpawnCounter, broken: Path, **supervisor: Any
) -> Config:
    """Model ``m``, whose starts fail (it exits 2) while the file ``broken`` exists. Creates it."""
    broken.touch()
    cmd = spawns.cmd("m", fail_while=broken)
    return make_config(state_dir, {"m": {"cmd": cmd}}, supervisor=supervisor)


@pytest.fixture
def clock() -> MockClock:
    # An autojumping clock that waits for 50 ms of real idleness before it jumps: the children
    # here are real processes that start and exit in real time. With a threshold of 0 the
    # clock would jump while one of them is being spawned and fire start_timeout early.
    return MockClock(autojump_threshold=0.05)


async def test_failed_starts_cool_down_with_503_and_retry_after(
    state_dir: Path, tmp_path: Path, spawns: SpawnCounter, clock: MockClock
) -> None:
    broken = tmp_path / "broken"
    config = failing_config(
        state_dir,
        spawns,
        broken,
        max_start_failures=3,
        failure_cooldown=30,
        start_timeout=600,
        health_interval=3600,
    )
    async with running_supervisor(config) as supervisor:
        model = supervisor.models["m"]
        for attempt in range(1, 4):
            with pytest.raises(UpstreamError) as failed:
                await supervisor.ensure_ready("m")
            assert failed.value.status == 502
            assert model.lifecycle.consecutive_failures == attempt
        failed_at = trio.current_time()
        # Exhausted: refused at once, without a spawn, for the whole cooldown.
        with pytest.raises(ModelUnavailable) as cooling:
            await supervisor.ensure_ready("m")
        assert cooling.value.status == 503
        assert (b"retry-after", b"30") in cooling.value.headers()
        assert "refusing to start" in cooling.value.message, "the last error is quoted"
        broken.unlink()
        await trio.sleep(29)
        with pytest.raises(ModelUnavailable) as still:
            await supervisor.ensure_ready("m")
        assert still.value.retry_after is not None and still.value.retry_after <= 1.01
        assert spawns.count("m") == 3
        await trio.sleep_until(failed_at + 30)
        await supervisor.ensure_ready("m")
        assert model.state is State.READY
        assert model.lifecycle.consecutive_failures == 0
        # The success reset the count: one more failed start is a 502 again, not a 503.
        await supervisor.unload("m")
        broken.touch()
        with pytest.raises(UpstreamError):
            await supervisor.ensure_ready("m")
        with pytest.raises(UpstreamError):
            await supervisor.ensure_ready("m")
    assert spawns.count("m") == 6


async def test_unload_clears_a_failure_cooldown(
    state_dir: Path, tmp_path: Path, spawns: SpawnCounter, clock: MockClock
) -> None:
    broken = tmp_path / "broken"
    config = failing_config(
        state_dir, spawns, broken, max_start_failures=1, failure_cooldown=3600, start_timeout=600
    )
    async with running_supervisor(config) as supervisor:
        with pytest.raises(UpstreamError):
            await supervisor.ensure_ready("m")
        with pytest.raises(ModelUnavailable):
            await supervisor.ensure_ready("m")
        broken.unlink()
        await supervisor.unload("m")
        assert supervisor.models["m"].state is State.STOPPED
        await supervisor.ensure_ready("m")


# -- wedged children ---------------------------------------------------------------------------


async def test_unresponsive_child_is_killed_and_failed(
    state_dir: Path, spawns: SpawnCounter
) -> None:
    # Real time: the health checks are real HTTP requests to a real (stopped) process.
    config = make_config(
        state_dir,
        {"m": {"cmd": spawns.cmd("m")}},
        supervisor={"health_interval": 0.2, "unhealthy_after": 3, "stop_grace": 30},
    )
    async with running_supervisor(config) as supervisor:
        await supervisor.ensure_ready("m")
        pid = supervisor.status()["m"].pid
        assert pid is not None
        try:
            async with transitions(supervisor) as events:
                with pytest.raises(UpstreamError, match="unresponsive"):
                    async with supervisor.lease("m"):
                        os.kill(pid, signal.SIGSTOP)
                        wedged = trio.current_time()
                        with trio.fail_after(5):
                            await trio.sleep_forever()
                failed = await next_event(events, State.FAILED)
            took = trio.current_time() - wedged
            # Killed with SIGKILL, not SIGTERM + 30 s of stop_grace: a stopped process cannot
            # act on SIGTERM (until our SIGCONT below, which would hide the difference).
            model = supervisor.models["m"]
            assert model.run is not None
            with trio.fail_after(2):
                await model.run.stopped.wait()
        finally:
            if not gone(pid):
                os.kill(pid, signal.SIGCONT)
        assert failed.reason == "unresponsive"
        assert took >= 3 * 0.2, "not before unhealthy_after checks failed"
        assert took < 5
        assert gone(pid)
        await supervisor.ensure_ready("m")
        assert supervisor.status()["m"].pid != pid
    assert spawns.count("m") == 2


# A health server that prints a line per check it answered ("health check N").
COUNTS_HEALTH_CHECKS = """
import http.server, sys
class Handler(http.server.BaseHTTPRequestHandler):
    checks = 0
    def do_GET(self):
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()
        Handler.checks += 1
        print("health check", Handler.checks, flush=True)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


async def test_healthy_child_is_left_alone_by_the_watchdog(state_dir: Path) -> None:
    config = make_config(
        state_dir,
        {"m": {"cmd": ["{python}", "-c", COUNTS_HEALTH_CHECKS, "{port}"]}},
        # Three failed checks in a row would restart it (a watchdog that counted healthy
        # answers as failures would, by the third), but not one probe slowed by a loaded
        # machine past its limit.
        supervisor={"health_interval": 0.05, "unhealthy_after": 3},
    )
    async with running_supervisor(config) as supervisor:
        await supervisor.ensure_ready("m")
        process = supervisor.models["m"].process
        assert process is not None
        with trio.fail_after(30):
            await process.wait_for_output("health check 11")  # readiness, then ten checks
        status = supervisor.status()["m"]
        assert status.state is State.READY
        assert status.pid == process.pid


# -- forced unload -----------------------------------------------------------------------------

IGNORES_SIGTERM_NEVER_LISTENS = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('armed', flush=True); time.sleep(60)"
)


async def force_unload_ends_it_at_once(supervisor: Supervisor, pid: int) -> None:
    """``unload m --force`` returns within a second, whatever grace is left; ``pid`` is gone."""
    start = trio.current_time()
    await supervisor.unload("m", force=True)
    assert trio.current_time() - start < 1
    assert supervisor.models["m"].state is State.STOPPED
    assert gone(pid)


async def test_force_unload_kills_a_model_stuck_starting(state_dir: Path) -> None:
    config = make_config(
        state_dir,
        {"m": {"cmd": ["{python}", "-c", IGNORES_SIGTERM_NEVER_LISTENS]}},
        supervisor={"stop_grace": 30, "start_timeout": 60},
    )
    async with running_supervisor(config) as supervisor, trio.open_nursery() as nursery:

        async def waiting_caller() -> None:
            with pytest.raises(UpstreamError, match="stopped while starting"):
                await supervisor.ensure_ready("m")

        nursery.start_soon(waiting_caller)
        process = await spawned(supervisor, "m")
        await process.wait_for_output("armed")
        await force_unload_ends_it_at_once(supervisor, process.pid)


async def test_force_unload_kills_a_model_stuck_stopping(state_dir: Path) -> None:
    config = make_config(
        state_dir,
        {"m": {"cmd": health_server_cmd("--ignore-sigterm")}},
        supervisor={"stop_grace": 30},
    )
    async with running_supervisor(config) as supervisor:
        await supervisor.ensure_ready("m")
        pid = supervisor.status()["m"].pid
        assert pid is not None
        async with trio.open_nursery() as nursery, transitions(supervisor) as events:
            nursery.start_soon(supervisor.unload, "m")  # graceful: SIGTERM, ignored
            await next_event(events, State.STOPPING)
            await trio.testing.wait_all_tasks_blocked()
            assert not gone(pid), "still waiting out its 30 s of grace"
            await force_unload_ends_it_at_once(supervisor, pid)


async def test_force_unload_fails_in_flight_leases(state_dir: Path) -> None:
    config = make_config(state_dir, {"m": {"cmd": health_server_cmd()}})
    async with running_supervisor(config) as supervisor:
        await supervisor.ensure_ready("m")
        async with trio.open_nursery() as nursery:

            async def in_flight() -> None:
                with pytest.raises(UpstreamError, match="unloaded with force"):
                    async with supervisor.lease("m"):
                        await trio.sleep_forever()

            nursery.start_soon(in_flight)
            await trio.testing.wait_all_tasks_blocked()
            assert supervisor.status()["m"].in_flight == 1
            await supervisor.unload("m", force=True)
        assert supervisor.status()["m"].in_flight == 0


class SlowStore(StateStore):
    """A state store whose child rows take a while to write (a slow disk)."""

    def record_child(self, **row: Any) -> int:
        time.sleep(0.3)
        return super().record_child(**row)


async def test_unload_while_the_spawn_is_being_recorded_leaves_no_process(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Between the spawn and the end of its bookkeeping (reading the process start time,
    # writing its row: both in worker threads) a cancelled start must still stop its process.
    real_start_time = trioserve.supervision.run.process_start_time

    def slow_start_time(pid: int) -> float | None:
        time.sleep(0.3)  # a busy /proc
        return real_start_time(pid)

    monkeypatch.setattr(trioserve.supervision.run, "process_start_time", slow_start_time)
    config = make_config(state_dir, {"m": {"cmd": health_server_cmd()}})
    writer = StoreWriter(SlowStore(state_dir))
    async with trio.open_nursery() as outer:
        await outer.start(writer.run)
        async with trio.open_nursery() as nursery:
            supervisor = Supervisor(config, instance="test-slow-store", store=writer)
            await nursery.start(supervisor.run)

            async def caller() -> None:
                with pytest.raises(UpstreamError):
                    await supervisor.ensure_ready("m")

            nursery.start_soon(caller)
            pid = (await spawned(supervisor, "m")).pid  # spawned, its row not yet written
            await supervisor.unload("m", force=True)
            assert gone(pid)
            nursery.cancel_scope.cancel()
        writer.close()
    (row,) = StateStore(state_dir).children()
    assert row.pid == pid and row.state == "stopped"
