"""Signals at every phase of the daemon's start-up: the signals are the daemon's from its first
line that owns anything. A SIGHUP never ends it (the reload it asks for runs once start-up is
complete); a SIGTERM stops it cleanly, leaving no process and no lock behind.

The daemon runs in this trio run and the signal is sent to this process from ``on_phase``, as
each phase begins; the autouse fixture fails a test that leaves a child (the guard included).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from tests.support.config import write_config
from tests.support.daemon import ThreadedDaemon
from tests.support.ports import free_port
from trioserve.config import Config, load_config
from trioserve.daemon import DaemonInfo, run_daemon
from trioserve.daemon_control import PHASES
from trioserve.host.running import live_daemon
from trioserve.host.store import InstanceLock, StateStore
from trioserve.reload import Reloader


@pytest.fixture
def config(tmp_path: Path, state_dir: Path) -> Config:
    """From a file: a reload reads it again."""
    return load_config(write_config(tmp_path / "c.toml", state_dir, free_port()))


@pytest.fixture(params=PHASES)
def phase(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def signal_at(phase: str, signum: int) -> tuple[list[str], Callable[[str], Awaitable[None]]]:
    """An ``on_phase`` hook that sends ``signum`` to this process as ``phase`` begins, and the
    list of phases it saw."""
    seen: list[str] = []

    async def on_phase(name: str) -> None:
        seen.append(name)
        if name == phase:
            os.kill(os.getpid(), signum)
            # Let the signal reach the daemon's watcher before start-up goes on.
            await trio.testing.wait_all_tasks_blocked()

    return seen, on_phase


async def test_sigterm_at_any_phase_of_start_up_stops_cleanly(
    config: Config, state_dir: Path, phase: str
) -> None:
    seen, on_phase = signal_at(phase, signal.SIGTERM)
    with trio.fail_after(30):
        await run_daemon(config, on_phase=on_phase)
    # It stopped where it was: no later phase began.
    assert seen[-1] == phase, seen
    # Nothing is left: no daemon recorded as running, the lock is free again.
    assert live_daemon(StateStore(state_dir)) is None
    lock = InstanceLock(state_dir)
    lock.acquire()
    lock.release()


async def test_sighup_at_any_phase_of_start_up_reloads_once_started(
    config: Config, phase: str
) -> None:
    seen, on_phase = signal_at(phase, signal.SIGHUP)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        with trio.fail_after(30):
            info: DaemonInfo = await nursery.start(
                lambda task_status: run_daemon(
                    config,
                    on_phase=on_phase,
                    shutdown_trigger=stop.wait,
                    task_status=task_status,
                )
            )
        assert seen == list(PHASES)
        async with httpx.AsyncClient(base_url=info.url, trust_env=False) as client:
            assert (await client.get("/health")).status_code == 200
            # The reload asked for during start-up ran after it, and succeeded.
            with trio.fail_after(10):
                while (await client.get("/admin/status")).json()["last_reload"] is None:
                    await trio.sleep(0.02)
            last = (await client.get("/admin/status")).json()["last_reload"]
            assert last["ok"] is True, last
            chat = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
            assert (await client.post("/v1/chat/completions", json=chat)).status_code == 200
        stop.set()


async def test_a_reload_that_breaks_unexpectedly_leaves_the_daemon_serving(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(self: Reloader) -> None:
        raise RuntimeError("a bug in putting the config in force")

    monkeypatch.setattr(Reloader, "reload", broken)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        info: DaemonInfo = await nursery.start(
            lambda task_status: run_daemon(
                config, shutdown_trigger=stop.wait, task_status=task_status
            )
        )
        os.kill(os.getpid(), signal.SIGHUP)
        await trio.testing.wait_all_tasks_blocked()
        async with httpx.AsyncClient(base_url=info.url, trust_env=False) as client:
            chat = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
            assert (await client.post("/v1/chat/completions", json=chat)).status_code == 200
        stop.set()


def test_without_signal_handling_it_runs_and_stops_off_the_main_thread(
    tmp_path: Path, state_dir: Path
) -> None:
    # Off the main thread trio cannot receive signals: with handle_signals=True the start
    # would fail at once. ThreadedDaemon passes False and stops it with shutdown_trigger.
    port = free_port()
    path = write_config(tmp_path / "c.toml", state_dir, port)
    daemon = ThreadedDaemon.start(path, f"http://127.0.0.1:{port}")
    try:
        assert daemon.info is not None and daemon.info.url == daemon.url
        assert daemon.status()["pid"] == os.getpid()
        chat = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
        assert daemon.http.post("/v1/chat/completions", json=chat).status_code == 200
    finally:
        daemon.stop()
    # Stopped as a SIGTERM stops it: its model reaped (the autouse fixture checks), nothing
    # recorded as running, the lock free again.
    assert live_daemon(StateStore(state_dir)) is None
    lock = InstanceLock(state_dir)
    lock.acquire()
    lock.release()
