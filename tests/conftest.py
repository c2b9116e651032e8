"""Shared test harness: configs, a real daemon on a loopback port, a real supervisor.

Everything here starts real things: echo backends as child processes, Hypercorn on 127.0.0.1,
the SQLite state store in a tmp dir.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import trio

from trioserve.config import Config, parse_config
from trioserve.daemon import DaemonInfo, run_daemon
from trioserve.supervisor import Supervisor

ECHO = ["{python}", "-m", "trioserve.backends.echo", "--port", "{port}"]

_port_base = 22000 + (os.getpid() % 50) * 200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def echo_cmd(*extra: str) -> list[str]:
    """The echo backend's argv with extra options, e.g. ``echo_cmd("--token-delay", "0.1")``."""
    return [*ECHO, *extra]


def make_config(
    state_dir: Path,
    models: dict[str, dict[str, Any]] | None = None,
    *,
    server: dict[str, Any] | None = None,
    supervisor: dict[str, Any] | None = None,
) -> Config:
    """A validated config with port 0 (any free port) and a private port range."""
    global _port_base
    first = _port_base
    _port_base += 40
    if _port_base > 31000:
        _port_base = 22000
    data: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0, "state_dir": str(state_dir), **(server or {})},
        "supervisor": {
            "port_range": [first, first + 39],
            "stop_grace": 2,
            "start_timeout": 20,
            **(supervisor or {}),
        },
        "models": models if models is not None else {"echo": {"cmd": echo_cmd()}},
    }
    return parse_config(data, "test.toml")


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path


@asynccontextmanager
async def running_daemon(config: Config) -> AsyncIterator[tuple[DaemonInfo, httpx.AsyncClient]]:
    """Run the whole daemon in this trio run; yields its info and a client bound to its URL.

    On exit the daemon is shut down the same way SIGTERM does it.
    """
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        info: DaemonInfo = await nursery.start(
            lambda task_status: run_daemon(
                config, shutdown_trigger=stop.wait, task_status=task_status
            )
        )
        try:
            async with httpx.AsyncClient(base_url=info.url, timeout=30, trust_env=False) as client:
                yield info, client
        finally:
            stop.set()


@asynccontextmanager
async def running_supervisor(config: Config) -> AsyncIterator[Supervisor]:
    """A supervisor without the HTTP layer; every child is stopped on exit."""
    async with trio.open_nursery() as nursery:
        supervisor = Supervisor(config, instance="test-" + os.urandom(4).hex())
        await nursery.start(supervisor.run)
        try:
            yield supervisor
        finally:
            nursery.cancel_scope.cancel()


def children_with_marker(instance: str) -> list[psutil.Process]:
    """Live (non-zombie) processes whose environment carries ``TRIOSERVE_INSTANCE=instance``."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get("TRIOSERVE_INSTANCE") == instance:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


@pytest.fixture(autouse=True)
def no_leftover_children() -> Iterator[None]:
    """Every test must leave no child process of ours behind (zombies included)."""
    yield
    me = psutil.Process()
    leftovers = [
        child
        for child in me.children(recursive=True)
        if child.is_running() and child.status() != psutil.STATUS_ZOMBIE
    ]
    zombies = [c for c in me.children() if c.is_running() and c.status() == psutil.STATUS_ZOMBIE]
    for child in leftovers:
        child.kill()
    assert not leftovers, f"test left child processes: {leftovers}"
    assert not zombies, f"test left zombies: {zombies}"


PYTHON = sys.executable
