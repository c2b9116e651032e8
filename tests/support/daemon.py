"""A daemon to test against: in this trio run, in a thread of this process, as a ``trioserve
start`` subprocess, or only its supervisor; and a check that nothing of it is left once it
stopped."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import threading
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


# -- over HTTP, however it runs ------------------------------------------------------------------


class DaemonHandle:
    """A daemon started from the config file ``config``, as a test talks to it at ``url``: one
    HTTP client, its admin, ``load`` and ``status``. ``DaemonProcess`` and ``ThreadedDaemon``
    add how it runs and stops."""

    def __init__(self, config: Path, url: str) -> None:
        self.config = config
        self.url = url
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

    def load(self, name: str) -> dict[str, Any]:
        response = self.http.post(f"/admin/models/{name}/load", auth=self.admin)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.http.get("/admin/status", timeout=10).json()
        return result

    def wait_status(
        self, check: Callable[[dict[str, Any]], bool], timeout: float = 10
    ) -> dict[str, Any]:
        """Poll ``/admin/status`` until ``check(status)``; returns the status."""
        # Polling is the honest tool here: the daemon sends no ready signal to a test.
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if check(status):
                return status
            assert time.monotonic() < deadline, status
            time.sleep(0.02)

    def close_http(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    def stop(self) -> None:
        """Stop the daemon and wait (bounded) until it has; closes ``http``."""
        raise NotImplementedError


# -- in a thread of this process -----------------------------------------------------------------


class ThreadedDaemon(DaemonHandle):
    """The whole daemon in a thread of this process, in a trio run of its own: for tests that
    only talk to a daemon (the CLI through CliRunner, HTTP clients), without a subprocess's
    start-up (~0.9 s of CPU, mostly imports this process has done already).

    It handles no signal (``run_daemon(handle_signals=False)``: only the main thread could),
    and its pid is the test's own: not for tests of ``trioserve stop``, of signals, of the
    daemon's exit or output.
    """

    # A start as long as DaemonProcess.wait_healthy allows; a stop past shutdown_grace (15 s
    # by default, for requests still in flight) and the models' stop_grace.
    START_WITHIN = 30.0
    STOP_WITHIN = 30.0

    def __init__(self, config: Path, url: str) -> None:
        super().__init__(config, url)
        loaded = load_config(config)
        self.pid = os.getpid()
        self.state_dir = loaded.state_dir
        self.info: DaemonInfo | None = None
        self._thread = threading.Thread(
            target=self._run, args=(loaded,), name=f"daemon at {url}", daemon=True
        )
        self._settled = threading.Event()  # started, or its run ended before
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop = trio.Event()

    @classmethod
    def start(cls, config: Path, url: str) -> ThreadedDaemon:
        """Run the daemon of the config file ``config``; returns once it listens (on the
        port of the config, which ``url`` names)."""
        daemon = cls(config, url)
        daemon._thread.start()
        if not daemon._settled.wait(cls.START_WITHIN):
            # Stopped, not left running: its thread, port, lock and children would outlive
            # the test otherwise.
            with contextlib.suppress(AssertionError):
                daemon.stop()
            raise AssertionError(f"daemon not started within {cls.START_WITHIN}s")
        if daemon.info is None:
            daemon._thread.join(cls.STOP_WITHIN)
            raise AssertionError("the daemon did not start") from daemon._error
        return daemon

    def _run(self, config: Config) -> None:
        try:
            trio.run(self._serve, config)
        except BaseException as exc:  # raised in the test's thread, by start or stop
            self._error = exc
        finally:
            self._settled.set()

    async def _serve(self, config: Config) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self.info = await nursery.start(
                functools.partial(
                    run_daemon, config, shutdown_trigger=self._stop.wait, handle_signals=False
                )
            )
            self._settled.set()

    def stop(self) -> None:
        """Shut it down as SIGTERM does, and wait (bounded) for its thread to end; raises
        what ended its run, if anything did. Closes ``http``. From a synchronous test only
        (``trio.from_thread`` refuses a call from inside a trio run)."""
        self.close_http()
        if self._thread.is_alive() and self._token is not None:
            # The event belongs to the daemon's run: set from there.
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(self.STOP_WITHIN)
        if self._thread.is_alive():
            raise AssertionError(f"daemon not stopped within {self.STOP_WITHIN}s")
        error, self._error = self._error, None
        if error is not None:
            raise AssertionError("the daemon's run failed") from error


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


class DaemonProcess(DaemonHandle):
    """``trioserve start`` as a subprocess of the test, its output in a file."""

    def __init__(self, proc: subprocess.Popen[bytes], config: Path, url: str, log: Path) -> None:
        super().__init__(config, url)
        self.proc = proc
        self.log = log

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
        self.close_http()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
