"""The echo backend alone, as a child process of the test: no daemon in between."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from tests.support.ports import free_port
from tests.support.status import backend_stats, wait_for_stats

# Generous: only reached when something is broken, and CI machines can be slow to start Python.
START_TIMEOUT = 15.0
# How long a disconnect may take to show in /stats. Every generation that should be cancelled
# in the tests would otherwise run for at least 10 s, so this bound tells prompt from eventual.
CANCEL_TIMEOUT = 3.0
# Between attempts to reach a starting child; polling is the honest tool only for that.
POLL_INTERVAL = 0.02


@dataclass
class Echo:
    """A running echo child and a client for it."""

    process: trio.Process
    port: int
    client: httpx.AsyncClient

    async def first_answer(self) -> httpx.Response:
        """The first /health answer, whatever its status, once the child listens."""
        with trio.fail_after(START_TIMEOUT):
            while True:
                assert self.process.returncode is None, "the echo backend exited while starting"
                try:
                    return await self.client.get("/health")
                except httpx.TransportError:
                    await trio.sleep(POLL_INTERVAL)

    async def wait_healthy(self) -> None:
        with trio.fail_after(START_TIMEOUT):
            while (await self.first_answer()).status_code != 200:
                await trio.sleep(POLL_INTERVAL)

    async def stats(self) -> dict[str, int]:
        return await backend_stats(self.port)

    async def wait_stats(self, key: str, value: int) -> dict[str, int]:
        """Stats once ``key`` reached ``value``; fails after CANCEL_TIMEOUT."""
        return await wait_for_stats(self.port, key, value, within=CANCEL_TIMEOUT)


async def stop(process: trio.Process) -> None:
    """Terminate and reap; a child that ignores SIGTERM is killed."""
    if process.returncode is None:
        process.terminate()
        with trio.move_on_after(5):
            await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()


@asynccontextmanager
async def echo_backend(*args: str, wait_healthy: bool = True) -> AsyncIterator[Echo]:
    """An echo child on a free loopback port, always terminated and reaped on exit."""
    port = free_port()
    command = [sys.executable, "-m", "trioserve.backends.echo", "--port", str(port), *args]
    # stdout and stderr are inherited so that pytest shows the child's log next to a failure.
    process = await trio.lowlevel.open_process(command, stdin=subprocess.DEVNULL)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            echo = Echo(process, port, client)
            if wait_healthy:
                await echo.wait_healthy()
            yield echo
    finally:
        with trio.CancelScope(shield=True):
            await stop(process)


def events(text: str) -> list[tuple[str | None, Any]]:
    """The events of a whole event stream: (the ``event:`` line's name or None, the data)."""
    assert text.endswith("\n\n"), text[-200:]
    parsed: list[tuple[str | None, Any]] = []
    for block in text.removesuffix("\n\n").split("\n\n"):
        name, data = None, None
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            else:
                assert line.startswith("data: "), block
                data = line.removeprefix("data: ")
        assert data is not None, block
        parsed.append((name, json.loads(data)))
    return parsed


def llama_error(response: httpx.Response, status: int, kind: str) -> str:
    """``response`` is llama-server's error answer of ``status``; returns its message."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert list(error) == ["code", "message", "type"], error
    assert (error["code"], error["type"]) == (status, kind)
    assert isinstance(error["message"], str)
    return error["message"]
