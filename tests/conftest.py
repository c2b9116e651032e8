"""Shared test harness: configs, a real daemon on a loopback port, a real supervisor.

Everything here starts real things: echo backends as child processes, Hypercorn on 127.0.0.1,
the SQLite state store in a tmp dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
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
from trioserve.supervision.supervisor import Supervisor

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


# -- supervisor tests (appended) -------------------------------------------------------------

# A tiny HTTP server for supervisor tests: /health answers 200 at once (no trio, no Hypercorn,
# so it starts in ~50 ms). Options after the port:
#   --ignore-sigterm   SIGTERM does nothing (a child that must be SIGKILLed)
#   --slow-exit S      on SIGTERM, wait S seconds, then exit 0 (a slow but polite child)
#   --record PATH      write argv, pid, pgid, sid and environment to PATH as JSON first
# Anything else is ignored, so argv handling can be checked with arbitrary extra arguments.
HEALTH_SERVER = r"""
import http.server, json, os, signal, sys, time
port, opts = int(sys.argv[1]), sys.argv[2:]
if "--ignore-sigterm" in opts:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if "--slow-exit" in opts:
    delay = float(opts[opts.index("--slow-exit") + 1])
    def slow_exit(signum, frame):
        time.sleep(delay)
        os._exit(0)
    signal.signal(signal.SIGTERM, slow_exit)
if "--record" in opts:
    with open(opts[opts.index("--record") + 1], "w") as f:
        json.dump({"argv": sys.argv, "pid": os.getpid(), "pgid": os.getpgid(0),
                   "sid": os.getsid(0), "env": dict(os.environ)}, f)
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", port), Handler)
print("serving on", port, flush=True)
server.serve_forever()
"""


def health_server_cmd(*options: str) -> list[str]:
    """A model ``cmd`` running ``HEALTH_SERVER`` on ``{port}`` with ``options``."""
    script = HEALTH_SERVER.replace("{", "{{").replace("}", "}}")  # not placeholders
    return ["{python}", "-c", script, "{port}", *options]


class SpawnCounter:
    """Counts model starts in the child itself: each start appends a line to a file, then
    execs the real backend (so the count cannot be faked by our own bookkeeping)."""

    _WRAPPER = (
        "import os, sys\n"
        "path, port, flag, rest = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]\n"
        "with open(path, 'a') as f:\n"
        "    f.write('x\\n')\n"
        "if flag and os.path.exists(flag):\n"
        "    print('refusing to start: ' + flag + ' exists', flush=True)\n"
        "    sys.exit(2)\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'trioserve.backends.echo',"
        " '--port', port, *rest])\n"
    )

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, name: str) -> Path:
        return self.directory / f"spawns-{name}.txt"

    def cmd(self, name: str, *echo_options: str, fail_while: Path | None = None) -> list[str]:
        """A cmd that counts under ``name``, then runs the echo backend with ``echo_options``;
        it exits with code 2 instead while the file ``fail_while`` exists."""
        flag = str(fail_while) if fail_while is not None else ""
        return ["{python}", "-c", self._WRAPPER, str(self.path(name)), "{port}", flag,
                *echo_options]  # fmt: skip

    def count(self, name: str) -> int:
        path = self.path(name)
        return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture
def spawns(tmp_path: Path) -> SpawnCounter:
    directory = tmp_path / "spawns"
    directory.mkdir()
    return SpawnCounter(directory)


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
                await nursery.start(supervisor.run)
                try:
                    yield supervisor
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            writer.close()


# -- CLI and daemon-subprocess tests (appended) ----------------------------------------------

TRIOSERVE_BIN = Path(sys.executable).parent / "trioserve"
# Variables of the outer environment that would change what a daemon or a CLI command does.
_ISOLATED_ENV = (
    "TRIOSERVE_CONFIG",
    "TRIOSERVE_URL",
    "TRIOSERVE_API_KEY",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "STATE_DIRECTORY",
    "COLUMNS",
)


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without the variables that steer trioserve, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in _ISOLATED_ENV}
    env.update(extra)
    return env


def take_port_range(size: int = 40) -> list[int]:
    """A private [first, last] for one test's children (same pool as ``make_config``)."""
    global _port_base
    first = _port_base
    _port_base += size
    if _port_base > 31000:
        _port_base = 22000
    return [first, first + size - 1]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
        )
    raise TypeError(f"no TOML for {value!r}")


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    """Write ``{"section": {...}, "models": {"name": {...}}}`` as TOML."""
    lines: list[str] = []
    for section, body in data.items():
        if section == "models":
            for name, model in body.items():
                lines.append(f"[models.{json.dumps(name)}]")
                lines.extend(f"{key} = {_toml_value(val)}" for key, val in model.items())
        else:
            lines.append(f"[{section}]")
            lines.extend(f"{key} = {_toml_value(val)}" for key, val in body.items())
    path.write_text("\n".join(lines) + "\n")
    return path


def daemon_config(
    path: Path,
    state_dir: Path,
    models: dict[str, dict[str, Any]] | None = None,
    *,
    server: dict[str, Any] | None = None,
    supervisor: dict[str, Any] | None = None,
) -> tuple[Path, str]:
    """A TOML config for a daemon subprocess on a free loopback port; returns (path, url)."""
    port = free_port()
    data = {
        "server": {
            "host": "127.0.0.1",
            "port": port,
            "state_dir": str(state_dir),
            **(server or {}),
        },
        "supervisor": {
            "port_range": take_port_range(),
            "stop_grace": 2,
            "start_timeout": 20,
            **(supervisor or {}),
        },
        "models": models if models is not None else {"echo": {"cmd": echo_cmd()}},
    }
    return write_toml(path, data), f"http://127.0.0.1:{port}"


class DaemonProcess:
    """``trioserve start`` as a subprocess of the test, its stderr in a file."""

    def __init__(self, proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.proc = proc
        self.url = url
        self.log = log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_healthy(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.stderr()}")
            try:
                if httpx.get(self.url + "/health", timeout=1, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"daemon not healthy within {timeout}s:\n{self.stderr()}")

    def load(self, name: str) -> dict[str, Any]:
        response = httpx.post(f"{self.url}/admin/models/{name}/load", timeout=30, trust_env=False)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = httpx.get(
            f"{self.url}/admin/status", timeout=10, trust_env=False
        ).json()
        return result

    def wait(self, timeout: float = 20) -> int:
        return self.proc.wait(timeout)


def processes_of_state_dir(root: Path) -> list[psutil.Process]:
    """Live processes whose TRIOSERVE_STATE_DIR lies under ``root`` (model children)."""
    found = []
    prefix = os.path.realpath(root)
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            state_dir = proc.environ().get("TRIOSERVE_STATE_DIR")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if state_dir and os.path.realpath(state_dir).startswith(prefix):
            found.append(proc)
    return found


def kill_and_wait(procs: list[psutil.Process]) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(procs, timeout=5)


@pytest.fixture
def spawn_daemon(tmp_path: Path) -> Iterator[Any]:
    """``spawn_daemon(config_path, url, *args, env=None)`` starts ``trioserve start`` and waits
    for /health. Teardown: SIGTERM (then SIGKILL) every daemon, and kill any model process of a
    state dir under tmp_path, e.g. orphans of a daemon a test SIGKILLed."""
    started: list[DaemonProcess] = []

    def spawn(
        config: Path,
        url: str,
        *args: str,
        env: dict[str, str] | None = None,
        healthy: bool = True,
    ) -> DaemonProcess:
        log = tmp_path / f"daemon-{len(started)}.log"
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                [str(TRIOSERVE_BIN), "start", "--config", str(config), *args],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                env=env if env is not None else clean_env(),
            )
        daemon = DaemonProcess(proc, url, log)
        started.append(daemon)
        if healthy:
            daemon.wait_healthy()
        return daemon

    try:
        yield spawn
    finally:
        for daemon in started:
            if daemon.proc.poll() is None:
                daemon.proc.terminate()
                try:
                    daemon.proc.wait(20)
                except subprocess.TimeoutExpired:
                    daemon.proc.kill()
                    daemon.proc.wait()
        kill_and_wait(processes_of_state_dir(tmp_path))
