"""``trioserve reload``: exit 0 with a one-line summary once the new config is in force, 1 with
the daemon's reason when it refused, 1 when no daemon runs. Against a real daemon, in a thread
of the test's process (a ``trioserve start`` where the process is checked or the console script
runs); through CliRunner, and a few through the installed console script."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.cli import error_line, invoke, run_trioserve
from tests.support.config import echo_cmd, write_config
from tests.support.daemon import DaemonProcess, ThreadedDaemon
from tests.support.ports import free_port, port_range

Spawn = Callable[..., DaemonProcess]


class Setup:
    """A config file on a fixed port, rewritten at will, and the daemon started from it."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "trioserve.toml"
        self.state_dir = tmp_path / "state"
        self.port = free_port()
        self.ports = port_range()
        self.url = f"http://127.0.0.1:{self.port}"

    def write(self, models: tuple[str, ...] = ("echo",), **server: Any) -> None:
        write_config(
            self.path,
            self.state_dir,
            self.port,
            {name: {"cmd": echo_cmd()} for name in models},
            server=server,
            supervisor={"port_range": self.ports},
        )

    def models(self, **headers: str) -> list[str]:
        answer = httpx.get(f"{self.url}/v1/models", headers=headers, timeout=10, trust_env=False)
        return [entry["id"] for entry in answer.json()["data"]]


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


@pytest.fixture
def running(
    setup: Setup, threaded_daemon: Callable[[Path, str], ThreadedDaemon]
) -> Iterator[ThreadedDaemon]:
    setup.write()
    yield threaded_daemon(setup.path, setup.url)


def test_reload_exits_0_with_the_summary_once_in_force(
    setup: Setup, running: ThreadedDaemon
) -> None:
    setup.write(("echo", "fresh"))
    result = invoke(["reload", "--config", str(setup.path)])
    assert result.exit_code == 0, result.output
    assert result.stdout == "reloaded: added: fresh\n"
    assert setup.models() == ["echo", "fresh"]  # in force when the command returned

    result = invoke(["reload"], TRIOSERVE_CONFIG=str(setup.path))
    assert result.exit_code == 0, result.output
    assert result.stdout == "reloaded: no changes\n"

    setup.write(("echo",))
    result = invoke(["reload", "--config", str(setup.path), "--json"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["removed"] == ["fresh"] and answer["summary"] == "removed: fresh"
    assert running.status()["last_reload"]["ok"] is True


def test_reload_of_an_invalid_file_exits_1_with_the_daemons_reason(
    setup: Setup, running: ThreadedDaemon
) -> None:
    # Not even TOML: the daemon is still found (through the state dir the file names), and
    # it is the daemon that says what is wrong, with the file, and refuses.
    setup.path.write_text(setup.path.read_text() + "[models.fresh\n")
    result = invoke(["reload", "--config", str(setup.path)])
    assert result.exit_code == 1, result.output
    line = error_line(result)
    assert line.startswith("trioserve: reload refused, nothing changed: "), line
    assert f"{setup.path}: invalid TOML" in line
    status = running.status()
    assert status["last_reload"]["ok"] is False
    assert "invalid TOML" in status["last_reload"]["error"]
    assert setup.models() == ["echo"]

    setup.write(("echo", "fresh"))
    bad = setup.path.read_text().replace("stop_grace = 2", "stop_grace = -1")
    setup.path.write_text(bad)
    result = invoke(["reload", "--config", str(setup.path)])
    assert result.exit_code == 1, result.output
    assert f"{setup.path}: supervisor.stop_grace: " in error_line(result)
    assert setup.models() == ["echo"]


def test_reload_that_needs_a_restart_exits_1(setup: Setup, spawn_daemon: Spawn) -> None:
    # A subprocess: that it still runs is checked.
    setup.write()
    running = spawn_daemon(setup.path, setup.url)
    setup.port = free_port()
    setup.write()
    result = invoke(["reload", "--config", str(setup.path)])
    assert result.exit_code == 1, result.output
    assert "server.port changed: that needs a restart" in error_line(result)
    assert running.proc.poll() is None


def test_reload_exits_1_when_no_daemon_runs(setup: Setup) -> None:
    setup.write()
    result = invoke(["reload", "--config", str(setup.path)])
    assert result.exit_code == 1, result.output
    assert error_line(result) == f"trioserve: no daemon is running for state_dir {setup.state_dir}"

    setup.path.write_text("[server\n")
    result = invoke(["reload", "--config", str(setup.path)])
    assert result.exit_code == 1, result.output
    assert "no daemon is running" in error_line(result)
    assert "the config is invalid" in error_line(result)

    result = invoke(["reload", "--url", f"http://127.0.0.1:{free_port()}"])
    assert result.exit_code == 1, result.output
    assert "no daemon answers at" in error_line(result)


def test_reload_waits_at_most_timeout_for_a_daemon_that_does_not_answer(setup: Setup) -> None:
    # Accepts connections (the kernel does, from the backlog) and never answers.
    with socket.create_server(("127.0.0.1", 0)) as mute:
        url = f"http://127.0.0.1:{mute.getsockname()[1]}"
        begin = time.monotonic()
        result = invoke(["reload", "--timeout", "0.5"], TRIOSERVE_URL=url)
        took = time.monotonic() - begin
    assert result.exit_code == 1, result.output
    assert "did not answer within 0.5s" in error_line(result)
    assert took < 5


def test_reload_presents_an_admin_key(
    setup: Setup, threaded_daemon: Callable[[Path, str], ThreadedDaemon]
) -> None:
    setup.write(admin_keys=["adm-1"])
    threaded_daemon(setup.path, setup.url)
    setup.write(("echo", "fresh"), admin_keys=["adm-1"])
    # Over TCP (--url), the key given is what counts.
    result = invoke(
        ["reload", "--config", str(setup.path), "--url", setup.url], TRIOSERVE_API_KEY="wrong"
    )
    assert result.exit_code == 1, result.output
    assert "admin key is required" in error_line(result)
    assert setup.models() == ["echo"]
    result = invoke(["reload", "--url", setup.url, "--api-key", "adm-1"])
    assert result.exit_code == 0, result.output
    assert setup.models() == ["echo", "fresh"]
    # No key given: the config file's admin key, as `systemctl reload` runs it.
    setup.write(("echo",), admin_keys=["adm-1"])
    result = invoke(["reload", "--config", str(setup.path), "--url", setup.url])
    assert result.exit_code == 0, result.output
    assert result.stdout == "reloaded: removed: fresh\n"
    # Without --url: the admin socket, where no key is needed (a wrong one changes nothing).
    setup.write(("echo", "fresh"), admin_keys=["adm-1"])
    result = invoke(["reload", "--config", str(setup.path)], TRIOSERVE_API_KEY="wrong")
    assert result.exit_code == 0, result.output
    assert setup.models() == ["echo", "fresh"]


def test_console_script_reload_exit_codes(setup: Setup, spawn_daemon: Spawn) -> None:
    setup.write()
    result = run_trioserve("reload", "--config", str(setup.path))
    assert result.returncode == 1, result
    assert "no daemon is running" in result.stderr

    spawn_daemon(setup.path, setup.url)
    setup.write(("echo", "fresh"))
    result = run_trioserve("reload", "--config", str(setup.path))
    assert result.returncode == 0, result
    assert result.stdout == "reloaded: added: fresh\n"

    setup.path.write_text(setup.path.read_text().replace("port_range", "port_rnage"))
    result = run_trioserve("reload", "--config", str(setup.path))
    assert result.returncode == 1, result
    assert "reload refused, nothing changed:" in result.stderr
    assert "supervisor.port_rnage: unknown key" in result.stderr
    assert "Traceback" not in result.stderr
