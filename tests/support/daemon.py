"""A daemon to test against: in this trio run, as a ``trioserve start`` subprocess, or only its
supervisor; and a check that nothing of it is left once it stopped."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import trio

from tests.support.admin import AdminAuth
from tests.support.processes import Resources, model_processes, trio_task_count
from trioserve.config import Config, load_config
from trioserve.daemon import DaemonInfo, run_daemon
from trioserve.supervision.supervisor import Supervisor

# -- in this trio run ----------------------------------------------------------------------------


@asynccontextmanager
async def running_daemon(
    config: Config, *, admin: bool = False
) -> AsyncIterator[tuple[DaemonInfo, httpx.AsyncClient]]:
    """Run the whole daemon in this trio run; yields its info and a client bound to its URL.
    With ``admin`` the client is the daemon's admin on ``/admin/`` (``tests.support.admin``);
    without, it is any client that reaches the port.

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
            auth = AdminAuth(config.state_dir) if admin else None
            async with httpx.AsyncClient(
                base_url=info.url, timeout=30, trust_env=False, auth=auth
            ) as client:
                yield info, client
        finally:
            stop.set()


class LeakCheck:
    """Around one daemon's whole life: fds and tasks of this process before it started and
    after it stopped, and no process with its marker afterwards."""

    def __init__(self) -> None:
        self.before = Resources.baseline()
        self.instance = ""

    async def verify(self) -> None:
        after = Resources.now()
        assert after.fds == self.before.fds, (self.before, after)
        assert after.tasks == self.before.tasks == trio_task_count(), (self.before, after)
        assert self.instance and model_processes(self.instance) == {}


@asynccontextmanager
async def leak_checked_daemon(
    config: Config, *, admin: bool = False
) -> AsyncIterator[tuple[DaemonInfo, httpx.AsyncClient]]:
    """``running_daemon(config, admin=admin)``; after it stopped, asserts that nothing of it
    is left."""
    check = LeakCheck()
    async with running_daemon(config, admin=admin) as (info, client):
        check.instance = info.instance
        yield info, client
    await check.verify()


@asynccontextmanager
async def running_supervisor(config: Config) -> AsyncIterator[Supervisor]:
    """A supervisor without the HTTP layer; every child is stopped on exit."""
    async with trio.open_nursery() as nursery:
        supervisor = Supervisor(config, instance="test-" + os.urandom(4).hex())
        await supervisor.prepare()
        await nursery.start(supervisor.run)
        try:
            yield supervisor
        finally:
            nursery.cancel_scope.cancel()


async def supervisor_reaches(supervisor: Supervisor, reached: Callable[[], bool]) -> None:
    """Return once ``reached()`` is true: checked now and at each lifecycle event (the states
    a supervisor reaches by itself: a start's end, a stop, an eviction)."""
    async with supervisor.events.subscribe() as events:
        if reached():
            return
        async for _ in events:
            if reached():
                return
    raise AssertionError("the supervisor stopped publishing events")


@asynccontextmanager
async def running_supervisor_with_store(config: Config) -> AsyncIterator[Supervisor]:
    """``running_supervisor`` plus the state store at ``config.state_dir``; on exit every
    child is stopped and every store write submitted meanwhile is done."""
    from trioserve.host.store import StateStore, StoreWriter

    writer = StoreWriter(StateStore(config.state_dir))
    async with trio.open_nursery() as outer:
        await outer.start(writer.run)
        try:
            async with trio.open_nursery() as nursery:
                supervisor = Supervisor(
                    config, instance="test-" + os.urandom(4).hex(), store=writer
                )
                await supervisor.prepare()
                await nursery.start(supervisor.run)
                try:
                    yield supervisor
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            writer.close()


# -- as a subprocess -----------------------------------------------------------------------------

TRIOSERVE_BIN = Path(sys.executable).parent / "trioserve"
# Variables of the outer environment that would change what a daemon or a CLI command does.
STEERING_ENV = (
    "TRIOSERVE_CONFIG",
    "TRIOSERVE_URL",
    "TRIOSERVE_API_KEY",
    "TRIOSERVE_CA_CERT",
    "TRIOSERVE_CLIENT_CERT",
    "TRIOSERVE_CLIENT_KEY",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "STATE_DIRECTORY",
    "COLUMNS",
)


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without the variables that steer trioserve, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in STEERING_ENV}
    env.update(extra)
    return env


class DaemonProcess:
    """``trioserve start`` as a subprocess of the test, its output in a file."""

    def __init__(self, proc: subprocess.Popen[bytes], config: Path, url: str, log: Path) -> None:
        self.proc = proc
        self.config = config
        self.url = url
        self.log = log
        self._http: httpx.Client | None = None

    @property
    def http(self) -> httpx.Client:
        """One client for this daemon's calls, closed by ``stop``: a client made per call
        costs ~25 ms of CPU (its TLS context), which polls and parallel workers multiply."""
        if self._http is None:
            # Idle connections are dropped well before the daemon's keep-alive timeout (5 s),
            # so that no request goes out on a connection the daemon is closing.
            limits = httpx.Limits(keepalive_expiry=1)
            self._http = httpx.Client(base_url=self.url, timeout=30, trust_env=False, limits=limits)
        return self._http

    @functools.cached_property
    def admin(self) -> AdminAuth:
        """Its admin, for ``auth=`` on a call over ``http`` (``tests.support.admin``); found
        through its config file, so that only a call that needs it reads the file."""
        return AdminAuth(load_config(self.config).state_dir)

    @classmethod
    def start(
        cls, config: Path, url: str, log: Path, *args: str, env: dict[str, str] | None = None
    ) -> DaemonProcess:
        """Start ``trioserve start --config config *args`` (in ``clean_env()`` by default)."""
        with open(log, "wb") as output:
            proc = subprocess.Popen(
                [str(TRIOSERVE_BIN), "start", "--config", str(config), *args],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                env=env if env is not None else clean_env(),
            )
        return cls(proc, config, url, log)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_healthy(self, timeout: float = 30) -> None:
        # Polling is the honest tool here: another process, with no ready signal to us.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.stderr()}")
            try:
                if self.http.get("/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"daemon not healthy within {timeout}s:\n{self.stderr()}")

    def load(self, name: str) -> dict[str, Any]:
        response = self.http.post(f"/admin/models/{name}/load", auth=self.admin)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.http.get("/admin/status", timeout=10).json()
        return result

    def wait(self, timeout: float = 20) -> int:
        return self.proc.wait(timeout)

    def kill_with_its_guard(self) -> None:
        """SIGKILL the daemon's guard, then the daemon: the one death nothing stops its models
        after (what ``cleanup`` and the next ``start`` are for). Reaped."""
        guards = [
            child
            for child in psutil.Process(self.pid).children()
            if "trioserve.host.guard" in " ".join(child.cmdline())
        ]
        assert guards, "the daemon has no guard process"
        # Stopped first, so it cannot start a new guard between the two kills.
        self.proc.send_signal(signal.SIGSTOP)
        for guard in guards:
            # Not waited for: its parent, stopped, cannot reap it; init does once that dies.
            guard.kill()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(20)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 20 s; reaped either way. Closes
        ``http``."""
        if self._http is not None:
            self._http.close()
            self._http = None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
