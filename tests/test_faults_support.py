"""Helpers shared by the fault, bad-input and leak tests (issue 7). No tests in here.

What "nothing left behind" means in these tests: no model process of the instance in the
process table, the daemon's open file descriptors and trio tasks back where they were, and
every error in the OpenAI shape.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import trio

from tests.conftest import make_config, running_daemon
from trioserve.config import Config
from trioserve.daemon import DaemonInfo

# Statuses a relayed request may end with when its model is being unloaded, evicted, expired,
# killed or is failing: anything but a 500 (a bug) or no answer at all (a hang).
CLEAN_ERROR_CODES = {
    400: "invalid_request",
    401: "invalid_api_key",
    404: "model_not_found",
    408: "invalid_request",
    413: "request_too_large",
    429: "queue_full",
    502: "upstream_error",
    503: "model_unavailable",
    504: "timeout",
}


# Model ports for these tests, apart from make_config's pool (22000-31039): several test runs
# share this machine, and a model port that another run's server grabbed would be answered
# by that server (see test_a_foreign_program_on_the_models_port_is_not_taken_for_the_model).
_PRIVATE_FIRST, _PRIVATE_SLOTS, _PRIVATE_SIZE = 31100, 40, 40
_private_next = os.getpid() * 7


def private_port_range() -> list[int]:
    """A [first, last] of 40 model ports for one test, below the ephemeral range."""
    global _private_next
    slot = _private_next % _PRIVATE_SLOTS
    _private_next += 1
    first = _PRIVATE_FIRST + slot * _PRIVATE_SIZE
    return [first, first + _PRIVATE_SIZE - 1]


def config_for(
    state_dir: Path,
    models: dict[str, dict[str, Any]] | None = None,
    *,
    server: dict[str, Any] | None = None,
    supervisor: dict[str, Any] | None = None,
) -> Config:
    """``make_config`` with a private port range for the models."""
    return make_config(
        state_dir,
        models,
        server=server,
        supervisor={"port_range": private_port_range(), **(supervisor or {})},
    )


def assert_openai_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """``response`` is ``status`` with the OpenAI error body ``{"error": {...}}`` of ``code``."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code"}, error
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    return dict(error)


def assert_clean_answer(status: int, body: bytes) -> None:
    """A non-streamed answer that is a success, or an error from the contract's table in the
    OpenAI shape; never a 500."""
    assert status != 500, body[:500]
    if status == 200:
        return
    assert status in CLEAN_ERROR_CODES, (status, body[:500])
    import json

    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "code"}, error
    assert error["code"] == CLEAN_ERROR_CODES[status], (status, error)


def trio_task_count() -> int:
    """Every task of this trio run: the root task and, recursively, its nurseries' tasks."""

    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(
            walk(child) for nursery in task.child_nurseries for child in nursery.child_tasks
        )

    root = trio.lowlevel.current_root_task()
    assert root is not None, "not in a trio run"
    return walk(root)


def model_processes(instance: str, root: int | None = None) -> dict[str, list[int]]:
    """Live model processes of ``instance`` among the descendants of ``root`` (default: this
    process), by their ``TRIOSERVE_MODEL`` marker: ``{model: [pid, ...]}``.

    Descendants rather than the whole process table: cheap enough to sample many times a
    second, and a model's grandchildren (which carry the marker too) are still found.
    """
    found: dict[str, list[int]] = {}
    try:
        procs = psutil.Process(root if root is not None else os.getpid()).children(recursive=True)
    except psutil.NoSuchProcess:
        return found
    for proc in procs:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            env = proc.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if env.get("TRIOSERVE_INSTANCE") == instance and "TRIOSERVE_MODEL" in env:
            found.setdefault(env["TRIOSERVE_MODEL"], []).append(proc.pid)
    return found


def model_groups(instance: str, root: int | None = None) -> dict[str, set[int]]:
    """The process groups of ``instance``'s model processes: ``{model: {pgid, ...}}``.

    What "one model never has two processes" means on a process table: a model's server may
    have helpers of its own (it may even fork ``ldconfig`` while it imports, as the echo
    backend does), all in the group the daemon gave it; a second *start* of the model is a
    second group.
    """
    groups: dict[str, set[int]] = {}
    for model, pids in model_processes(instance, root).items():
        for pid in pids:
            try:
                groups.setdefault(model, set()).add(os.getpgid(pid))
            except ProcessLookupError:
                continue
    return groups


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie is not running: it only waits to be reaped)."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


async def eventually(
    check: Callable[[], bool], *, within: float, what: str, interval: float = 0.02
) -> None:
    """Poll ``check`` until it holds; fail with ``what`` after ``within`` seconds.

    For what nothing announces (a process reaped by init, an fd closed by the kernel)."""
    deadline = trio.current_time() + within
    while not check():
        if trio.current_time() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        await trio.sleep(interval)


@dataclass(frozen=True)
class Resources:
    """What a daemon running in this process holds: fds, trio tasks, resident memory."""

    fds: int
    tasks: int
    rss: int

    @classmethod
    def now(cls) -> Resources:
        me = psutil.Process()
        return cls(me.num_fds(), trio_task_count(), me.memory_info().rss)


async def wait_for_baseline(
    baseline: Resources, *, within: float, fd_slack: int = 0, task_slack: int = 0
) -> Resources:
    """Wait until fds and tasks are back to ``baseline`` (closing a socket or ending a task
    happens a moment after the client has its answer); returns the last snapshot."""
    last = Resources.now()

    def back() -> bool:
        nonlocal last
        last = Resources.now()
        return last.fds <= baseline.fds + fd_slack and last.tasks <= baseline.tasks + task_slack

    try:
        await eventually(back, within=within, what="resources back to baseline", interval=0.05)
    except AssertionError:
        raise AssertionError(f"resources not back to {baseline} within {within}s: {last}") from None
    return last


def raw_address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def response_complete(response: bytes | bytearray) -> bool:
    """True once ``response`` holds a whole HTTP/1.1 response with a Content-Length."""
    head, sep, body = response.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    return False


async def raw_exchange(url: str, data: bytes, *, within: float = 10.0) -> tuple[bytes, bool]:
    """Send ``data`` on a fresh connection; read one response (to its Content-Length) or until
    the server closes, or ``within`` passes. Returns (what was read, whether it closed)."""
    host, port = raw_address(url)
    stream = await trio.open_tcp_stream(host, port)
    received = bytearray()
    closed = False
    async with stream:
        # It may answer and close before taking all of it: then read what it said.
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(data)
        with trio.move_on_after(within):
            while not response_complete(received):
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    closed = True
                    break
                if not chunk:
                    closed = True
                    break
                received += chunk
    return bytes(received), closed


def status_of(head: bytes) -> int:
    """The status code of a raw HTTP/1.1 response."""
    assert head.startswith(b"HTTP/1.1 "), head[:200]
    return int(head.split(b" ", 2)[1])


class LeakCheck:
    """Around one daemon's whole life: fds and tasks of this process before it started and
    after it stopped, and no process with its marker afterwards."""

    def __init__(self) -> None:
        self.before = Resources.now()
        self.instance = ""

    async def verify(self) -> None:
        after = Resources.now()
        assert after.fds == self.before.fds, (self.before, after)
        assert after.tasks == self.before.tasks == trio_task_count(), (self.before, after)
        assert self.instance and model_processes(self.instance) == {}


@asynccontextmanager
async def leak_checked_daemon(
    config: Config,
) -> AsyncIterator[tuple[DaemonInfo, httpx.AsyncClient]]:
    """``running_daemon(config)``; after it stopped, asserts that nothing of it is left."""
    check = LeakCheck()
    async with running_daemon(config) as (info, client):
        check.instance = info.instance
        yield info, client
    await check.verify()
