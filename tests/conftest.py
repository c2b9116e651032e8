"""Fixtures shared by the tests; the helpers they use live in ``tests.support``."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from tests.support.config import SpawnCounter
from tests.support.daemon import DaemonProcess, ThreadedDaemon
from tests.support.guard_parent import Adopter
from tests.support.notify import NotifyPeer
from tests.support.processes import kill_and_wait, processes_of_state_dir


def pytest_addoption(parser: pytest.Parser) -> None:
    # `make pytest` runs the suite twice: in parallel workers with --skip-quiet, then the
    # `quiet` tests alone with --only-quiet. Options rather than `-m`, so that a `-m` of the
    # caller's (PYTEST_ARGS) narrows both runs instead of replacing the split.
    group = parser.getgroup("trioserve")
    group.addoption(
        "--skip-quiet",
        action="store_true",
        help="deselect the tests marked quiet (they run apart, on a quiet machine)",
    )
    group.addoption("--only-quiet", action="store_true", help="run only the tests marked quiet")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip, only = config.getoption("--skip-quiet"), config.getoption("--only-quiet")
    if not (skip or only):
        return
    if skip and only:
        raise pytest.UsageError("--skip-quiet and --only-quiet exclude each other")
    keep: list[pytest.Item] = []
    deselected: list[pytest.Item] = []
    for item in items:
        quiet = item.get_closest_marker("quiet") is not None
        (keep if quiet == only else deselected).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = keep


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


@pytest.fixture
def adopter() -> Iterator[Adopter]:
    """This process as the subreaper of its orphaned descendants for the test; teardown (run
    whether the test passed or failed) kills and reaps whatever the test left."""
    with Adopter() as adopter:
        yield adopter
        adopter.cleanup()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path


@pytest.fixture
def spawns(tmp_path: Path) -> SpawnCounter:
    directory = tmp_path / "spawns"
    directory.mkdir()
    return SpawnCounter(directory)


@pytest.fixture
def spawn_daemon(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """``spawn_daemon(config_path, url, *args, env=None, healthy=True)`` starts ``trioserve
    start`` and (unless ``healthy=False``) waits for /health. Teardown: SIGTERM (then SIGKILL)
    every daemon, and kill any model process of a state dir under tmp_path, e.g. orphans of a
    daemon a test SIGKILLed."""
    started: list[DaemonProcess] = []

    def spawn(
        config: Path,
        url: str,
        *args: str,
        env: dict[str, str] | None = None,
        healthy: bool = True,
    ) -> DaemonProcess:
        log = tmp_path / f"daemon-{len(started)}.log"
        daemon = DaemonProcess.start(config, url, log, *args, env=env)
        started.append(daemon)
        if healthy:
            daemon.wait_healthy()
        return daemon

    try:
        yield spawn
    finally:
        for daemon in started:
            daemon.stop()
        kill_and_wait(processes_of_state_dir(tmp_path))


@pytest.fixture
def threaded_daemon() -> Iterator[Callable[[Path, str], ThreadedDaemon]]:
    """``threaded_daemon(config_path, url)``: ``spawn_daemon``'s daemon in a thread of this
    process (``ThreadedDaemon``), for tests that only talk to it; returns once it listens.
    Teardown: stop every daemon, then kill any model process of their state dirs."""
    started: list[ThreadedDaemon] = []

    def start(config: Path, url: str) -> ThreadedDaemon:
        daemon = ThreadedDaemon.start(config, url)
        started.append(daemon)
        return daemon

    yield start
    with contextlib.ExitStack() as stops:
        # Last, whether a stop failed or not: none should have left anything.
        stops.callback(
            lambda: kill_and_wait(
                [proc for daemon in started for proc in processes_of_state_dir(daemon.state_dir)]
            )
        )
        for daemon in started:
            stops.callback(daemon.stop)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory for unix sockets: sun_path holds 108 bytes, and pytest's tmp_path (with
    the test's name in it) can be longer than that."""
    path = Path(tempfile.mkdtemp(prefix="tsn-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["path", "abstract"])
def peer(request: pytest.FixtureRequest, short_dir: Path) -> Iterator[NotifyPeer]:
    """systemd's end of NOTIFY_SOCKET, on a path and on an abstract name."""
    notify_peer = NotifyPeer.bind(request.param, short_dir)
    try:
        yield notify_peer
    finally:
        notify_peer.sock.close()


@pytest.fixture
def notify_peer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifyPeer]:
    """systemd's end for a daemon in this process (it reads NOTIFY_SOCKET at start)."""
    peer = NotifyPeer.bind("abstract", tmp_path)
    monkeypatch.setenv("NOTIFY_SOCKET", peer.notify_socket)
    try:
        yield peer
    finally:
        peer.sock.close()
