"""No model process outlives its daemon: a real ``trioserve start`` SIGKILLed with models loaded
and loading, its guard SIGKILLed alone, a second daemon beside it, and its terminal closed.

What is gone, and when, is read from the process table (pidfds, /proc), never from the daemon's
or the guard's word. This process makes itself the child subreaper (``Adopter``): a SIGKILLed
daemon's children are re-parented to us rather than to PID 1 (which, in a container, may never
reap them), so we reap them, read how each one died, and leave none behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.support.admin import AdminAuth
from tests.support.cli import run_trioserve
from tests.support.config import daemon_config, echo_cmd, health_server_cmd, script_cmd
from tests.support.daemon import TRIOSERVE_BIN, DaemonProcess, clean_env
from tests.support.guard_parent import Adopter, Exits
from tests.support.processes import alive, children_with_marker, model_processes

pytestmark = pytest.mark.slow

GRACE = 0.5  # the models' stop_grace
# The bound: every model process gone within stop_grace + 0.5 s of the daemon's death.
BOUND = 0.5
SETTLE = 30.0  # seconds any setting-up step may take on a loaded machine

# A model server. Options after the port:
#   --ignore-sigterm   SIGTERM does nothing: only SIGKILL ends it
#   --grandchild       first fork a helper that ignores SIGTERM and stays in the group
#   --never-healthy    /health answers 503 for ever: a model that is still loading
# It prints "serving" once it listens (its output is the model's log in the daemon).
MODEL = r"""
import http.server, os, signal, sys, time
port, opts = int(sys.argv[1]), sys.argv[2:]
if "--ignore-sigterm" in opts:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if "--grandchild" in opts:
    r, w = os.pipe()
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.write(w, b"x")
        time.sleep(600)
        os._exit(0)
    os.read(r, 1)
status = 503 if "--never-healthy" in opts else 200
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", port), Handler)
print("serving", flush=True)
server.serve_forever()
"""


def model_cmd(*options: str) -> list[str]:
    return script_cmd(MODEL, "{port}", *options)


# The three kinds: one with a grandchild in its group, one that ignores SIGTERM, one
# still loading. `start_timeout` is far away, so the loading one never fails by itself.
THREE_KINDS = {
    "family": {"cmd": model_cmd("--grandchild")},
    "stubborn": {"cmd": health_server_cmd("--ignore-sigterm")},
    "loading": {"cmd": model_cmd("--never-healthy")},
}
# One model that ignores SIGTERM and one that does not.
STUBBORN_AND_PLAIN = {
    "stubborn": {"cmd": health_server_cmd("--ignore-sigterm")},
    "plain": {"cmd": health_server_cmd()},
}
SUPERVISOR = {"stop_grace": GRACE, "start_timeout": 120, "max_loaded": 4}


# -- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture
def spawn(adopter: Adopter, spawn_daemon: Callable[..., DaemonProcess]) -> Callable[..., Any]:
    """``spawn_daemon``, with this process as the subreaper from before the first daemon until
    after the fixture stopped the last one (``adopter`` is set up first, torn down last)."""
    return spawn_daemon


def wait_until(check: Callable[[], Any], what: str, within: float = SETTLE) -> Any:
    """Poll ``check`` until it returns something true, and return that. (Polling: these are
    other processes, and nothing tells us.)"""
    deadline = time.monotonic() + within
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        time.sleep(0.01)
    return result


def guards_of(daemon: int) -> list[int]:
    """The daemon's running guard processes (children running ``trioserve.host.guard``)."""
    found = []
    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(daemon).children():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
                if child.status() != psutil.STATUS_ZOMBIE and "trioserve.host.guard" in " ".join(
                    child.cmdline()
                ):
                    found.append(child.pid)
    return found


def start_guarded(
    tmp_path: Path,
    spawn: Callable[..., DaemonProcess],
    models: dict[str, dict[str, Any]],
    *load: str,
) -> tuple[Path, str, DaemonProcess, str, int]:
    """A daemon of ``models`` with the SUPERVISOR settings, started once its guard is up, with
    the models ``load`` loaded one after the other: its config, URL, process, instance id and
    guard's pid."""
    config, url = daemon_config(
        tmp_path / "c.toml", tmp_path / "state", models, supervisor=SUPERVISOR
    )
    daemon = spawn(config, url)
    instance, guard = daemon.status()["instance"], the_guard(daemon)
    for model in load:
        daemon.load(model)
    return config, url, daemon, instance, guard


def the_guard(daemon: DaemonProcess, other_than: int | None = None) -> int:
    """The pid of the daemon's guard once it is up (and is not ``other_than``)."""

    def up() -> int | None:
        log = daemon.stderr()
        for pid in guards_of(daemon.pid):
            if pid != other_than and f"guard pid {pid} is watching" in log:
                return pid
        return None

    guard: int = wait_until(up, f"a guard of daemon {daemon.pid} other than {other_than}")
    return guard


def processes(daemon: DaemonProcess, instance: str, counts: dict[str, int]) -> dict[str, list[int]]:
    """Wait until the daemon's descendants hold ``counts[model]`` processes of each model (by
    their marker); return them."""

    def found() -> dict[str, list[int]] | None:
        current = model_processes(instance, root=daemon.pid)
        ok = all(len(current.get(model, [])) == n for model, n in counts.items())
        return current if ok else None

    result: dict[str, list[int]] = wait_until(found, f"model processes {counts}")
    return result


def model_said(daemon: DaemonProcess, model: str, text: str) -> bool:
    response = daemon.http.get(
        f"/admin/models/{model}/logs", params={"tail": 50}, timeout=10, auth=daemon.admin
    )
    return response.status_code == 200 and text in response.text


class Background(threading.Thread):
    """One HTTP request in a thread (a load that does not finish before the daemon dies)."""

    def __init__(self, method: str, url: str, **kwargs: Any) -> None:
        super().__init__(daemon=True)
        self.request = (method, url, kwargs)
        self.outcome: httpx.Response | Exception | None = None

    def run(self) -> None:
        method, url, kwargs = self.request
        try:
            self.outcome = httpx.request(
                method, url, timeout=SETTLE + 30, trust_env=False, **kwargs
            )
        except Exception as exc:  # the daemon died under it
            self.outcome = exc


def kill_daemon_and_watch(
    daemon: DaemonProcess, pids: list[int], guard: int, adopter: Adopter
) -> dict[int, float]:
    """SIGKILL the daemon; wait for ``pids`` and ``guard`` to end, reaping each as it does.
    Returns when each one ended, in seconds after the SIGKILL."""
    with Exits([*pids, guard]) as exits:
        killed_at = time.monotonic()
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait()
        exits.wait(GRACE + 10, on_exit=adopter.reap)
    return {pid: round(at - killed_at, 3) for pid, at in exits.ended.items()}


def assert_all_gone_in_time(pids: list[int], late: dict[int, float], adopter: Adopter) -> None:
    """Every one of ``pids`` ended within the bound, and was reaped by us: an orphan of the dead
    daemon is re-parented to us, the subreaper, so none is left as a zombie for a PID 1 that
    may never reap it (a zombie whose parent is ours counts as gone only once we reaped it)."""
    survivors = [pid for pid in pids if pid not in late]
    assert not survivors, f"model processes outlived their daemon: {survivors}"
    assert max(late[pid] for pid in pids) <= GRACE + BOUND, late
    unreaped = [pid for pid in pids if adopter.reap(pid) is None]
    assert not unreaped, f"ended but not reaped by us: {unreaped}"


def signalled(adopter: Adopter, pid: int) -> int | None:
    """The signal that ended ``pid`` (reaped by us), None if it exited."""
    status = adopter.reap(pid)
    assert status is not None, f"pid {pid} not reaped by us"
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else None


def assert_nothing_left(instance: str, guard: int, config: Path, adopter: Adopter) -> None:
    """After the daemon's death: from the process table, not from anyone's word, nothing
    carries the instance's marker; the guard did its work and exited by itself; and
    ``trioserve status`` shows nothing alive."""
    assert children_with_marker(instance) == []
    assert adopter.reap(guard) == 0
    assert_status_shows_nothing_alive(config)


def assert_status_shows_nothing_alive(config: Path) -> None:
    """``trioserve status``, as a user runs it: no daemon, and no model process alive."""
    result = run_trioserve("status", "--config", str(config), "--json")
    assert result.returncode == 3, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["daemon"] is None and report["running_daemon"] is None, report
    alive_left = [item for item in report["leftovers"] if item["alive"]]
    assert not alive_left, alive_left
    result = run_trioserve("status", "--config", str(config))
    assert result.returncode == 3
    assert "still running without a daemon" not in result.stdout, result.stdout


def chat(url: str, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "still there?"}]}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30, trust_env=False)


# -- the daemon SIGKILLed --------------------------------------------------------------------


def test_daemon_sigkill_stops_family_stubborn_and_loading_models_within_grace(
    tmp_path: Path, spawn: Callable[..., DaemonProcess], adopter: Adopter
) -> None:
    config, url, daemon, instance, guard = start_guarded(
        tmp_path, spawn, THREE_KINDS, "family", "stubborn"
    )
    loader = Background("POST", f"{url}/admin/models/loading/load", auth=daemon.admin)
    loader.start()
    try:
        by_model = processes(daemon, instance, {"family": 2, "stubborn": 1, "loading": 1})
        wait_until(lambda: model_said(daemon, "loading", "serving"), "the loading model listens")
        assert daemon.status()["models"]["loading"]["state"] == "starting"
        pids = [pid for group in by_model.values() for pid in group]
        leaders = {daemon.status()["models"][m]["pid"] for m in ("family", "stubborn", "loading")}
        (grandchild,) = set(by_model["family"]) - leaders

        late = kill_daemon_and_watch(daemon, pids, guard, adopter)
    finally:
        loader.join(SETTLE)
    assert not isinstance(loader.outcome, httpx.Response), "the loading model became ready"

    assert_all_gone_in_time(pids, late, adopter)
    # How each died: SIGTERM where it was enough; SIGKILL, not before the grace, where not.
    for pid in (*by_model["stubborn"], grandchild):
        assert signalled(adopter, pid) == signal.SIGKILL
        assert late[pid] >= GRACE, late
    for pid in (by_model["loading"][0], *(set(by_model["family"]) - {grandchild})):
        assert signalled(adopter, pid) == signal.SIGTERM
    assert_nothing_left(instance, guard, config, adopter)


def test_daemon_sigkill_at_a_models_spawn_stops_it_within_grace(
    tmp_path: Path, spawn: Callable[..., DaemonProcess], adopter: Adopter
) -> None:
    # SIGKILLed the moment the model's process exists: maybe before the daemon told the guard
    # of it (then the guard finds it by its marker). It ignores SIGTERM once it has set up.
    models = {"loading": {"cmd": model_cmd("--never-healthy", "--ignore-sigterm")}}
    config, url, daemon, instance, guard = start_guarded(tmp_path, spawn, models)
    loader = Background("POST", f"{url}/admin/models/loading/load", auth=daemon.admin)
    loader.start()
    try:
        pids = processes(daemon, instance, {"loading": 1})["loading"]
        late = kill_daemon_and_watch(daemon, pids, guard, adopter)
    finally:
        loader.join(SETTLE)
    assert_all_gone_in_time(pids, late, adopter)
    assert_nothing_left(instance, guard, config, adopter)


def test_guard_sigkilled_alone_is_replaced_and_a_later_daemon_sigkill_is_covered(
    tmp_path: Path, spawn: Callable[..., DaemonProcess], adopter: Adopter
) -> None:
    config, _, daemon, instance, first = start_guarded(
        tmp_path, spawn, STUBBORN_AND_PLAIN, "stubborn", "plain"
    )
    by_model = processes(daemon, instance, {"stubborn": 1, "plain": 1})
    pids = [pid for group in by_model.values() for pid in group]

    os.kill(first, signal.SIGKILL)
    second = the_guard(daemon, other_than=first)
    log = daemon.stderr()
    assert f"guard pid {first} died (killed by SIGKILL)" in log, log
    watching = re.search(rf"guard pid {second} is watching over (\d+) children", log)
    assert watching is not None and watching.group(1) == "2", log
    assert os.getsid(second) == second  # in a session of its own, as the first one was
    assert all(alive(pid) for pid in pids)  # the guard's death touched no model

    late = kill_daemon_and_watch(daemon, pids, second, adopter)
    assert_all_gone_in_time(pids, late, adopter)
    # The new guard knew of the children the first one was told of: it gave the grace, then
    # SIGKILLed the one that ignores SIGTERM.
    assert signalled(adopter, by_model["stubborn"][0]) == signal.SIGKILL
    assert late[by_model["stubborn"][0]] >= GRACE, late
    assert_nothing_left(instance, second, config, adopter)


def test_second_daemon_is_untouched_by_the_first_ones_death(
    tmp_path: Path, spawn: Callable[..., DaemonProcess], adopter: Adopter
) -> None:
    config1, url1 = daemon_config(
        tmp_path / "1.toml", tmp_path / "state1", STUBBORN_AND_PLAIN, supervisor=SUPERVISOR
    )
    # Another state dir, listening port and model port range (daemon_config takes new ones).
    config2, url2 = daemon_config(
        tmp_path / "2.toml",
        tmp_path / "state2",
        {"echo": {"cmd": echo_cmd()}},
        supervisor=SUPERVISOR,
    )
    first, second = spawn(config1, url1), spawn(config2, url2)
    first_instance, second_instance = first.status()["instance"], second.status()["instance"]
    first_guard, second_guard = the_guard(first), the_guard(second)
    first.load("stubborn")
    first.load("plain")
    second.load("echo")
    assert chat(url2, "echo").status_code == 200
    echo_pid = second.status()["models"]["echo"]["pid"]
    first_by_model = processes(first, first_instance, {"stubborn": 1, "plain": 1})
    first_pids = [pid for group in first_by_model.values() for pid in group]
    second_pids = model_processes(second_instance, root=second.pid)["echo"]

    with Exits([*second_pids, second_guard]) as watch_second:
        late = kill_daemon_and_watch(first, first_pids, first_guard, adopter)
        assert_all_gone_in_time(first_pids, late, adopter)
        assert adopter.reap(first_guard) == 0  # it has exited: whatever it did is done
        assert all(watch_second.alive(pid) for pid in [*second_pids, second_guard])
    assert children_with_marker(first_instance) == []
    assert_status_shows_nothing_alive(config1)
    # The second one still serves, with the same model process and the same guard.
    response = chat(url2, "echo")
    assert response.status_code == 200, response.text
    assert second.status()["models"]["echo"]["pid"] == echo_pid
    assert guards_of(second.pid) == [second_guard]

    # And it stops cleanly, leaving nothing behind either.
    with Exits([*second_pids, second_guard]) as exits:
        second.proc.terminate()
        assert second.wait(30) == 0, second.stderr()
        exits.wait(5)
        assert set(exits.ended) == {*second_pids, second_guard}
    assert children_with_marker(second_instance) == []


# -- the terminal closed ---------------------------------------------------------------------

# Runs in the daemon's process before it becomes `trioserve start` (exec keeps the pid): it is a
# session leader (start_new_session) whose stdin is the pty's slave; make that its controlling
# terminal, as a login shell's is.
TAKE_TTY = (
    "import fcntl, os, sys, termios\n"
    "fcntl.ioctl(0, termios.TIOCSCTTY, 0)\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


class Terminal:
    """The master side of a pty, read so the daemon's writes to it never block, until closed."""

    def __init__(self) -> None:
        self.master, self.slave = pty.openpty()
        os.set_blocking(self.master, False)
        self.output = bytearray()

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while data := os.read(self.master, 65536):
                self.output.extend(data)

    def text(self) -> str:
        self.drain()
        return self.output.decode(errors="replace")

    def hang_up(self) -> None:
        """Close the master: the kernel hangs the terminal up (SIGHUP to its session; writes
        to it fail with EIO from now on)."""
        self.drain()
        os.close(self.master)


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def test_closed_terminal_leaves_daemon_and_models_serving_then_sigterm_stops_cleanly(
    tmp_path: Path, adopter: Adopter
) -> None:
    # health_interval 0.5: the daemon logs every health check, so it keeps writing to the
    # terminal after it went away.
    supervisor = {**SUPERVISOR, "health_interval": 0.5}
    state_dir = tmp_path / "state"
    config, url = daemon_config(
        tmp_path / "c.toml",
        state_dir,
        {"echo": {"cmd": echo_cmd()}},
        supervisor=supervisor,
    )
    terminal = Terminal()
    try:
        daemon = subprocess.Popen(
            [sys.executable, "-c", TAKE_TTY, str(TRIOSERVE_BIN), "start", "--config", str(config)],
            stdin=terminal.slave,
            stdout=terminal.slave,
            stderr=terminal.slave,
            env=clean_env(),
            start_new_session=True,
        )
        try:
            tty = os.ttyname(terminal.slave)
        finally:
            os.close(terminal.slave)
    except BaseException:
        os.close(terminal.master)
        raise
    # One client for every call (see DaemonProcess.http), closed at the end.
    http = httpx.Client(
        base_url=url,
        timeout=30,
        trust_env=False,
        limits=httpx.Limits(keepalive_expiry=1),
        auth=AdminAuth(state_dir),
    )
    try:

        def healthy() -> bool:
            assert daemon.poll() is None, f"daemon exited:\n{terminal.text()}"
            terminal.drain()
            with contextlib.suppress(httpx.HTTPError):
                return http.get("/health", timeout=1).status_code == 200
            return False

        wait_until(healthy, f"daemon healthy:\n{terminal.text()}")
        assert psutil.Process(daemon.pid).terminal() == tty  # its controlling terminal
        assert os.getsid(daemon.pid) == daemon.pid
        response = http.post("/admin/models/echo/load")
        assert response.status_code == 200, response.text
        status = http.get("/admin/status").json()
        instance, echo = status["instance"], status["models"]["echo"]["pid"]
        guard = wait_until(lambda: guards_of(daemon.pid), "the guard")[0]
        assert "listening on" in terminal.text()
        # A new model in the file: once it shows up, the daemon took the hang-up's SIGHUP as a
        # reload (and was not killed by it).
        text = config.read_text()
        config.write_text(text + '\n[models.echo2]\ncmd = ["{python}", "-c", "pass"]\n')

        terminal.hang_up()

        def reloaded() -> bool:
            assert daemon.poll() is None, f"the hang-up ended the daemon ({daemon.returncode})"
            status = http.get("/admin/status").json()
            return "echo2" in status["models"]

        wait_until(reloaded, "the hang-up's SIGHUP reloaded the config")
        # The daemon and its model live on and serve; the model is the same process.
        for _ in range(3):
            response = chat(url, "echo")
            assert response.status_code == 200, response.text
        assert daemon.poll() is None
        assert alive(echo) and alive(guard)
        status = http.get("/admin/status").json()
        assert status["models"]["echo"]["pid"] == echo
        # It keeps logging (health checks, a load and an unload, another SIGHUP) into the dead
        # terminal without crashing or spinning.
        for action in ("unload", "load"):
            response = http.post(f"/admin/models/echo/{action}")
            assert response.status_code == 200, response.text
        os.kill(daemon.pid, signal.SIGHUP)
        echo = http.get("/admin/status").json()["models"]["echo"]["pid"]
        before = {pid: cpu_seconds(pid) for pid in (daemon.pid, guard)}
        time.sleep(2)
        used = {pid: round(cpu_seconds(pid) - spent, 2) for pid, spent in before.items()}
        assert used[daemon.pid] < 0.3 and used[guard] < 0.1, used  # 2 s of one core: 2.0
        assert daemon.poll() is None
        assert chat(url, "echo").status_code == 200

        # A normal SIGTERM stops it cleanly: exit 0, its model and its guard gone, no orphan.
        with Exits([echo, guard]) as exits:
            daemon.terminate()
            assert daemon.wait(30) == 0
            exits.wait(5)
            assert set(exits.ended) == {echo, guard}
        assert children_with_marker(instance) == []
    finally:
        http.close()
        if daemon.poll() is None:
            daemon.kill()
        daemon.wait()
