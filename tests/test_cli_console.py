"""The installed `trioserve` console script against a real daemon subprocess: status, stop,
cleanup after a SIGKILLed daemon, cleanup beside a live one, logs --follow (and its Ctrl-C, also
against a stand-in that never answers)."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.support.cli import run_trioserve
from tests.support.config import daemon_config, echo_cmd
from tests.support.daemon import TRIOSERVE_BIN, DaemonProcess, clean_env
from tests.support.processes import alive, processes_of_state_dir


def two_model_daemon(
    tmp_path: Path, spawn_daemon: Any
) -> tuple[DaemonProcess, Path, dict[str, int]]:
    config, url = daemon_config(
        tmp_path / "c.toml",
        tmp_path / "state",
        {"alpha": {"cmd": echo_cmd()}, "beta": {"cmd": echo_cmd()}},
    )
    daemon = spawn_daemon(config, url)
    pids = {}
    for name in ("alpha", "beta"):
        daemon.load(name)
        pids[name] = daemon.status()["models"][name]["pid"]
    return daemon, config, pids


@pytest.mark.slow
def test_sigkilled_daemon_leftovers_status_then_cleanup(tmp_path: Path, spawn_daemon: Any) -> None:
    daemon, config, pids = two_model_daemon(tmp_path, spawn_daemon)
    # With its guard: a daemon SIGKILLed alone has its models stopped by the guard.
    daemon.kill_with_its_guard()
    assert all(alive(pid) for pid in pids.values())

    status = run_trioserve("status", "--url", daemon.url, "--config", str(config))
    assert status.returncode == 3, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0] == f"no daemon answers at {daemon.url}"
    for name, pid in pids.items():
        [row] = [line.split() for line in lines if line.startswith(f"{name} ")]
        assert row[1] == str(pid)
        assert row[4] == "yes"  # ALIVE
    assert "2 model process(es) still running without a daemon" in status.stdout

    as_json = run_trioserve("status", "--json", "--url", daemon.url, "--config", str(config))
    assert as_json.returncode == 3
    report = json.loads(as_json.stdout)
    assert report["daemon"] is None
    assert {(item["model"], item["pid"], item["alive"]) for item in report["leftovers"]} == {
        ("alpha", pids["alpha"], True),
        ("beta", pids["beta"], True),
    }

    dry = run_trioserve("cleanup", "--dry-run", "--config", str(config))
    assert dry.returncode == 0, dry.stderr
    assert "dry run: would kill 2 process group(s)" in dry.stdout
    assert all(alive(pid) for pid in pids.values())

    refused = run_trioserve("cleanup", "--config", str(config))  # stdin is not a terminal
    assert refused.returncode == 2
    assert "pass --yes" in refused.stderr
    assert all(alive(pid) for pid in pids.values())

    done = run_trioserve("cleanup", "--yes", "--config", str(config))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "killed 2 process group(s); nothing is left" in done.stdout
    assert not any(alive(pid) for pid in pids.values())
    assert processes_of_state_dir(tmp_path) == []

    after = run_trioserve("status", "--url", daemon.url, "--config", str(config))
    assert after.returncode == 3
    assert "records no model process" in after.stdout
    again = run_trioserve("cleanup", "--yes", "--config", str(config))
    assert again.returncode == 0
    assert again.stdout.strip() == f"nothing to clean up for {tmp_path / 'state'}"


def test_cleanup_beside_a_live_daemon_leaves_its_children_alone(
    tmp_path: Path, spawn_daemon: Any
) -> None:
    config, url = daemon_config(tmp_path / "c.toml", tmp_path / "state")
    daemon = spawn_daemon(config, url)
    daemon.load("echo")
    pid = daemon.status()["models"]["echo"]["pid"]
    result = run_trioserve("cleanup", "--yes", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"a daemon is running for {tmp_path / 'state'} (pid {daemon.pid}, {url}): "
        "its models are left alone",
        f"nothing to clean up for {tmp_path / 'state'}",
    ]
    assert alive(pid)
    assert daemon.status()["models"]["echo"]["state"] == "ready"


@pytest.mark.slow
def test_status_then_stop_through_the_console_script(tmp_path: Path, spawn_daemon: Any) -> None:
    config, url = daemon_config(tmp_path / "c.toml", tmp_path / "state")
    daemon = spawn_daemon(config, url)
    daemon.load("echo")
    child = daemon.status()["models"]["echo"]["pid"]

    status = run_trioserve("status", "--url", url)
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[0].startswith(f"trioserve 0.1.0 at {url}: pid {daemon.pid}")
    assert status.stdout.splitlines()[2].split()[:3] == ["echo", "ready", str(child)]

    stop = run_trioserve("stop", "--config", str(config))
    assert stop.returncode == 0, stop.stderr
    assert f"trioserve pid {daemon.pid} stopped" in stop.stdout
    assert daemon.wait(timeout=1) == 0
    assert not alive(child)

    gone = run_trioserve("status", "--url", url, "--config", str(config))
    assert gone.returncode == 3
    assert gone.stdout.splitlines()[0] == f"no daemon answers at {url}"
    assert run_trioserve("stop", "--config", str(config)).returncode == 1


class LineReader:
    """Lines from a pipe, with a deadline. Reads the raw fd: a buffered text stream may hold
    lines that select() cannot see."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pending = b""

    def until(self, done: Callable[[list[str]], bool], timeout: float = 20) -> list[str]:
        lines: list[str] = []
        deadline = time.monotonic() + timeout
        while not done(lines):
            if b"\n" in self.pending:
                line, self.pending = self.pending.split(b"\n", 1)
                lines.append(line.decode())
                continue
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"timed out; got {lines}"
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if ready:
                chunk = os.read(self.fd, 65536)
                assert chunk, f"follow ended early; got {lines}"
                self.pending += chunk
        return lines


def spawn_follow(
    url: str, config: Path, *, sigint_ignored: bool = False
) -> subprocess.Popen[bytes]:
    """``trioserve logs echo --follow`` against ``url``, its output piped. The config names the
    state folder: where the command finds the local admin token that model logs need.

    With ``sigint_ignored`` it starts with SIGINT ignored, as a command a non-interactive shell
    puts in the background (``cmd &``) does, and with it everything that command starts: a test
    run launched that way included (an ignored signal stays ignored across fork and exec).
    """
    command = [str(TRIOSERVE_BIN), "logs", "echo", "--follow", "--url", url]
    command += ["--config", str(config)]
    if sigint_ignored:
        command = ["sh", "-c", 'trap "" INT; exec "$0" "$@"', *command]
    return subprocess.Popen(
        command,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def stop_with_ctrl_c(follow: subprocess.Popen[bytes], within: float = 10) -> None:
    """SIGINT to ``follow``, which must then exit 0 within ``within`` seconds, without a word
    about the interrupt on stderr. Both pipes are drained meanwhile: a full one cannot hold the
    exit up, and a failure shows what the command wrote."""
    follow.send_signal(signal.SIGINT)
    try:
        _, err = follow.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        follow.kill()
        _, err = follow.communicate()
        stderr = err.decode(errors="replace")
        pytest.fail(f"still running {within} s after SIGINT; stderr:\n{stderr}")
    stderr = err.decode(errors="replace")
    assert follow.returncode == 0, stderr
    # Neither a traceback nor an "Exception ignored ... KeyboardInterrupt" (an interrupt lost).
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr


def reap(follow: subprocess.Popen[bytes]) -> None:
    if follow.poll() is None:
        follow.kill()
        follow.wait()
    for stream in (follow.stdout, follow.stderr):
        if stream is not None:
            stream.close()


def test_logs_follow_prints_only_new_lines_until_ctrl_c(tmp_path: Path, spawn_daemon: Any) -> None:
    config, url = daemon_config(tmp_path / "c.toml", tmp_path / "state")
    daemon = spawn_daemon(config, url)
    daemon.load("echo")
    follow = spawn_follow(url, config)
    assert follow.stdout is not None
    reader = LineReader(follow.stdout.fileno())
    try:

        def starts(lines: list[str]) -> int:
            return sum(line.startswith("--- trioserve: starting echo") for line in lines)

        first = reader.until(lambda lines: any("Running on" in x for x in lines))
        assert starts(first) == 1
        # Restart the model: its output ring gets a second "starting" line and more.
        httpx.post(
            f"{url}/admin/models/echo/unload", trust_env=False, timeout=30, auth=daemon.admin
        )
        daemon.load("echo")
        more = reader.until(
            lambda lines: starts(lines) == 1 and any("Running on" in x for x in lines)
        )
        # Nothing printed twice: exactly one new "starting" line and what followed it.
        assert starts(more) == 1
        assert not set(first) & set(more), (first, more)
        stop_with_ctrl_c(follow)
    finally:
        reap(follow)


# Ctrl-C wherever the command is, against a stand-in for the daemon that never answers: no
# model to load, and the moment of the signal is known. A request arrived means the command is
# running (in trio.run) and waits for the answer; a connection in SYN_SENT, that it waits for
# the connect.


@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_logs_follow_exits_0_on_ctrl_c_while_its_request_waits(tmp_path: Path, sigint: str) -> None:
    config, _ = daemon_config(tmp_path / "c.toml", tmp_path / "state")
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(20)
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        follow = spawn_follow(url, config, sigint_ignored=sigint == "ignored")
        try:
            connection, _ = server.accept()
            with connection:
                connection.settimeout(20)
                assert connection.recv(65536).startswith(b"GET /admin/models/echo/logs")
                stop_with_ctrl_c(follow)
        finally:
            reap(follow)


def test_logs_follow_exits_0_on_ctrl_c_while_it_connects(tmp_path: Path) -> None:
    config, _ = daemon_config(tmp_path / "c.toml", tmp_path / "state")
    # With its accept queue full (backlog 0 holds one connection, never accepted) the listener
    # drops every further SYN: the command's connect stays in SYN_SENT, for its connect timeout.
    with (
        socket.create_server(("127.0.0.1", 0), backlog=0) as server,
        socket.create_connection(server.getsockname(), timeout=5),
    ):
        port = server.getsockname()[1]
        follow = spawn_follow(f"http://127.0.0.1:{port}", config)
        try:
            me = psutil.Process(follow.pid)
            deadline = time.monotonic() + 20
            while True:
                assert follow.poll() is None, follow.communicate()
                if any(
                    conn.status == psutil.CONN_SYN_SENT and conn.raddr and conn.raddr.port == port
                    for conn in me.net_connections("tcp4")
                ):
                    break
                assert time.monotonic() < deadline, "no connect attempt within 20 s"
                time.sleep(0.01)
            stop_with_ctrl_c(follow)
        finally:
            reap(follow)
