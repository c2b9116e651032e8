"""Every command through typer's CliRunner, against a real daemon: in a thread of the test's
process where the CLI only talks to it, as a subprocess where it stops it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import psutil
import pytest
from typer.testing import Result

from tests.support.cli import error_line, invoke
from tests.support.config import daemon_config, echo_cmd, health_server_cmd
from tests.support.daemon import ThreadedDaemon
from tests.support.ports import free_port
from tests.support.processes import alive
from trioserve_cli.client_cmds import new_lines

FAILING = ["{python}", "-c", "import sys; print('cannot load weights', flush=True); sys.exit(3)"]


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


class Daemon:
    def __init__(self, proc: ThreadedDaemon, config: Path, state_dir: Path) -> None:
        self.proc = proc
        self.config = config
        self.state_dir = state_dir
        self.url = proc.url

    def invoke(self, args: list[str]) -> Result:
        """``trioserve ARGS`` as this daemon's admin runs it: TRIOSERVE_CONFIG names its
        config, so admin calls over ``--url`` carry its local admin token."""
        return invoke(args, TRIOSERVE_CONFIG=str(self.config))


@pytest.fixture
def daemon(tmp_path: Path, threaded_daemon: Any) -> Daemon:
    state_dir = tmp_path / "state"
    config, url = daemon_config(
        tmp_path / "c.toml",
        state_dir,
        {
            "echo": {"cmd": echo_cmd(), "aliases": ["e"]},
            "two": {"cmd": echo_cmd()},
            "bad": {"cmd": FAILING},
        },
        supervisor={"max_loaded": 3},
    )
    return Daemon(threaded_daemon(config, url), config, state_dir)


# -- status --------------------------------------------------------------------------------------


def test_status_shows_a_table_of_models(daemon: Daemon) -> None:
    daemon.proc.load("echo")
    result = invoke(["status", "--url", daemon.url])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"trioserve 0.1.0 at {daemon.url}: pid {daemon.proc.pid}")
    assert lines[1].split() == [
        "MODEL",
        "STATE",
        "PID",
        "PORT",
        "IN-FLIGHT",
        "QUEUED",
        "UPTIME",
        "RESTARTS",
        "MEMORY",
        "LAST",
        "ERROR",
    ]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    models = daemon.proc.status()["models"]
    assert rows["echo"][:6] == [
        "echo",
        "ready",
        str(models["echo"]["pid"]),
        str(models["echo"]["port"]),
        "0",
        "0",
    ]
    assert re.fullmatch(r"\d+s", rows["echo"][6])
    # Its MEMORY is what was measured of echo (one command, one figure): "cpu 31.2 MiB".
    assert rows["two"][:8] == ["two", "stopped", "-", "-", "0", "0", "-", "0"]
    assert rows["two"][-1] == "-"


def test_status_shows_the_first_line_of_last_error(daemon: Daemon) -> None:
    daemon.invoke(["models", "load", "bad", "--url", daemon.url])
    result = invoke(["status", "--url", daemon.url])
    assert result.exit_code == 0, result.output
    [row] = [line for line in result.stdout.splitlines() if line.startswith("bad ")]
    assert "failed" in row
    assert "process exited with code 3 before it became healthy" in row
    assert "cannot load weights" not in row  # the quoted output is not on the status line


def test_status_json_is_the_raw_admin_status(daemon: Daemon) -> None:
    result = invoke(["status", "--json", "--url", daemon.url])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["pid"] == daemon.proc.pid
    assert set(answer) >= {"pid", "version", "instance", "started_at", "uptime_s", "models"}
    assert set(answer["models"]) == {"echo", "two", "bad"}


def test_status_finds_the_daemon_through_the_config_when_no_url(daemon: Daemon) -> None:
    result = invoke(["status", "--config", str(daemon.config)])
    assert result.exit_code == 0, result.output
    assert f"at {daemon.url}: pid {daemon.proc.pid}" in result.stdout


def test_status_uses_trioserve_url(daemon: Daemon) -> None:
    result = invoke(["status", "--json"], TRIOSERVE_URL=daemon.url)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["pid"] == daemon.proc.pid


def test_status_without_daemon_exits_3_and_says_so(tmp_path: Path) -> None:
    config, _ = daemon_config(tmp_path / "c.toml", tmp_path / "state")
    url = dead_url()
    result = invoke(["status", "--url", url, "--config", str(config)])
    assert result.exit_code == 3, result.output
    assert result.stdout.splitlines() == [
        f"no daemon answers at {url}",
        f"the state store ({tmp_path / 'state'}) records no model process",
    ]


def test_status_json_without_daemon_describes_leftovers(tmp_path: Path) -> None:
    config, _ = daemon_config(tmp_path / "c.toml", tmp_path / "state")
    url = dead_url()
    result = invoke(["status", "--json", "--url", url], TRIOSERVE_CONFIG=str(config))
    assert result.exit_code == 3, result.output
    assert json.loads(result.stdout) == {
        "daemon": None,
        "url": url,
        "state_dir": str(tmp_path / "state"),
        "error": None,
        "running_daemon": None,
        "leftovers": [],
    }


def test_status_names_a_running_daemon_at_another_url(daemon: Daemon) -> None:
    url = dead_url()
    result = invoke(["status", "--url", url, "--config", str(daemon.config)])
    assert result.exit_code == 3, result.output
    assert f"a daemon is running for {daemon.state_dir}: pid {daemon.proc.pid}" in result.stdout
    assert f"try --url {daemon.url}" in result.stdout


def test_status_with_an_invalid_explicit_config_exits_2(tmp_path: Path) -> None:
    result = invoke(["status", "--url", dead_url(), "--config", str(tmp_path / "none.toml")])
    assert result.exit_code == 2
    assert error_line(result) == (
        f"trioserve: {tmp_path / 'none.toml'}: cannot read: No such file or directory"
    )


def test_status_of_a_server_that_is_not_trioserve(daemon: Daemon) -> None:
    # The echo backend speaks HTTP but has no /admin/status.
    port = daemon.proc.load("echo")["port"]
    result = invoke(["status", "--url", f"http://127.0.0.1:{port}"])
    assert result.exit_code == 1
    assert error_line(result) == (
        f"trioserve: GET http://127.0.0.1:{port}/admin/status: No route for /admin/status. "
        "(is this a trioserve daemon?)"
    )


# -- api keys ------------------------------------------------------------------------------------


def test_api_key_option_and_env(tmp_path: Path, threaded_daemon: Any) -> None:
    config, url = daemon_config(
        tmp_path / "c.toml",
        tmp_path / "state",
        server={"api_keys": ["user-key"], "admin_keys": ["admin-key"]},
    )
    threaded_daemon(config, url)
    refused = invoke(["status", "--url", url])
    assert refused.exit_code == 1
    assert error_line(refused) == (
        "trioserve: GET /admin/status needs admin: pass --api-key with an admin key, or --config "
        f"with the config of the daemon at {url} so that its admin socket or local admin token "
        "can be used"
    )
    assert invoke(["status", "--url", url, "--api-key", "admin-key"]).exit_code == 0
    assert invoke(["status", "--url", url], TRIOSERVE_API_KEY="admin-key").exit_code == 0
    listed = invoke(["models", "list", "--url", url, "--api-key", "user-key"])
    assert listed.exit_code == 0, listed.output


# -- models --------------------------------------------------------------------------------------


def test_models_list_shows_names_aliases_and_states(daemon: Daemon) -> None:
    daemon.proc.load("two")
    result = invoke(["models", "list", "--url", daemon.url])
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.stdout.splitlines()]
    assert rows[0] == ["MODEL", "STATE"]
    assert sorted(rows[1:]) == [
        ["bad", "stopped"],
        ["e", "stopped"],
        ["echo", "stopped"],
        ["two", "ready"],
    ]


def test_models_list_json(daemon: Daemon) -> None:
    result = invoke(["models", "list", "--json", "--url", daemon.url])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["object"] == "list"
    assert {entry["id"] for entry in answer["data"]} == {"echo", "e", "two", "bad"}


def test_models_load_shows_progress_until_ready(daemon: Daemon) -> None:
    result = daemon.invoke(["models", "load", "echo", "--url", daemon.url])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"echo: stopped -> starting \(\d+\.\ds\): requested", lines[0]), lines
    assert re.fullmatch(r"echo: starting -> ready \(\d+\.\ds\): healthy", lines[1]), lines
    port = daemon.proc.status()["models"]["echo"]["port"]
    assert re.fullmatch(rf"echo: ready on port {port} \(\d+\.\ds\)", lines[2]), lines
    assert len(lines) == 3


def test_models_load_of_a_ready_model_answers_at_once(daemon: Daemon) -> None:
    daemon.proc.load("echo")
    result = daemon.invoke(["models", "load", "e", "--url", daemon.url])
    assert result.exit_code == 0, result.output
    assert re.fullmatch(r"echo: ready on port \d+ \(\d+\.\ds\)", result.stdout.strip())


def test_models_load_failure_exits_1_with_the_reason(daemon: Daemon) -> None:
    result = daemon.invoke(["models", "load", "bad", "--url", daemon.url])
    assert result.exit_code == 1, result.output
    assert re.search(
        r"bad: starting -> failed \(\d+\.\ds\): process exited with code 3", result.stdout
    )
    assert error_line(result) == (
        "trioserve: model 'bad' failed to start: process exited with code 3 before it became "
        "healthy; last output:"
    )
    # The model's own last words follow, indented.
    assert "  cannot load weights" in result.stderr.splitlines()


def test_models_load_unknown_name(daemon: Daemon) -> None:
    result = daemon.invoke(["models", "load", "nope", "--url", daemon.url])
    assert result.exit_code == 1
    assert error_line(result) == (
        "trioserve: model 'nope' does not exist; known models: bad, e, echo, two"
    )


@pytest.mark.parametrize("force", [False, True])
def test_models_unload(daemon: Daemon, force: bool) -> None:
    daemon.proc.load("echo")
    pid = daemon.proc.status()["models"]["echo"]["pid"]
    args = ["models", "unload", "echo", "--url", daemon.url] + (["--force"] if force else [])
    result = daemon.invoke(args)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "echo: stopped"
    assert not alive(pid)


# -- logs ----------------------------------------------------------------------------------------


def test_logs_tail(daemon: Daemon) -> None:
    daemon.proc.load("echo")
    everything = daemon.invoke(["logs", "echo", "--url", daemon.url])
    assert everything.exit_code == 0, everything.output
    lines = everything.stdout.splitlines()
    assert lines[0].startswith("--- trioserve: starting echo: [")
    last = daemon.invoke(["logs", "echo", "--tail", "1", "--url", daemon.url])
    assert last.stdout.splitlines() == lines[-1:]
    none = daemon.invoke(["logs", "echo", "--tail", "0", "--url", daemon.url])
    assert none.exit_code == 0 and none.stdout == ""


def test_logs_of_unknown_model(daemon: Daemon) -> None:
    result = daemon.invoke(["logs", "nope", "--url", daemon.url])
    assert result.exit_code == 1
    assert error_line(result).startswith("trioserve: model 'nope' does not exist")


def test_new_lines_counts_past_what_was_seen() -> None:
    assert new_lines([], ["a", "b"]) == ["a", "b"]
    assert new_lines(["a", "b"], ["a", "b", "c"]) == ["c"]
    assert new_lines(["a", "b"], ["a", "b"]) == []
    # The ring dropped old lines: the overlap is found by the longest matching seam.
    assert new_lines(["a", "b", "c", "d"], ["c", "d", "e", "f"]) == ["e", "f"]
    # A partial last line that has grown since.
    assert new_lines(["a", "b", "par"], ["a", "b", "partial", "c"]) == ["partial", "c"]
    # More than a whole window between two polls: the window is printed.
    assert new_lines(["a", "b"], ["x", "y"]) == ["x", "y"]


# -- no daemon: one line, exit 1 -----------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["models", "list"],
        ["models", "load", "echo"],
        ["models", "unload", "echo", "--force"],
        ["logs", "echo"],
        ["logs", "echo", "--follow"],
    ],
)
def test_client_commands_without_daemon_fail_with_one_line(args: list[str]) -> None:
    url = dead_url()
    result = invoke([*args, "--url", url])
    assert result.exit_code == 1, result.output
    assert result.stderr == f"trioserve: no daemon answers at {url}\n"


# -- stop ----------------------------------------------------------------------------------------


def test_stop_stops_the_daemon_and_its_children(tmp_path: Path, spawn_daemon: Any) -> None:
    # A subprocess: `stop` signals the daemon's pid.
    config, url = daemon_config(tmp_path / "c.toml", tmp_path / "state")
    daemon = spawn_daemon(config, url)
    child = daemon.load("echo")
    child_pid = daemon.status()["models"]["echo"]["pid"]
    assert child["state"] == "ready"
    result = invoke(["stop", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].startswith(f"stopping trioserve pid {daemon.pid} (")
    assert re.fullmatch(
        rf"trioserve pid {daemon.pid} stopped \(\d+\.\ds\)", result.stdout.splitlines()[1]
    )
    # Exited, not just signalled: reaping it here must not block.
    assert daemon.wait(timeout=1) == 0
    assert not psutil.pid_exists(child_pid)


def test_stop_without_daemon_fails(tmp_path: Path) -> None:
    config, _ = daemon_config(tmp_path / "c.toml", tmp_path / "state")
    result = invoke(["stop"], TRIOSERVE_CONFIG=str(config))
    assert result.exit_code == 1
    assert error_line(result) == (
        f"trioserve: no daemon is running for state_dir {tmp_path / 'state'}"
    )


def test_stop_reports_a_timeout_with_exit_1(tmp_path: Path, spawn_daemon: Any) -> None:
    # The model ignores SIGTERM and the daemon gives it stop_grace = 1.5 s: longer than --timeout.
    config, url = daemon_config(
        tmp_path / "c.toml",
        tmp_path / "state",
        {"stubborn": {"cmd": health_server_cmd("--ignore-sigterm")}},
        supervisor={"stop_grace": 1.5},
    )
    daemon = spawn_daemon(config, url)
    daemon.load("stubborn")
    result = invoke(["stop", "--config", str(config), "--timeout", "0.5"])
    assert result.exit_code == 1, result.output
    assert error_line(result) == (
        f"trioserve: trioserve pid {daemon.pid} is still running after 0.5s (it may still be "
        f"stopping models); force it with: kill -KILL {daemon.pid}, then: trioserve cleanup"
    )
    # It goes on stopping on its own.
    assert daemon.wait(timeout=20) == 0


def test_every_command_has_help() -> None:
    for args in (
        [],
        ["start"],
        ["stop"],
        ["status"],
        ["cleanup"],
        ["models"],
        ["models", "list"],
        ["models", "load"],
        ["models", "unload"],
        ["logs"],
        ["config", "check"],
        ["reload"],
        ["users"],
        ["ui"],
    ):
        result = invoke([*args, "--help"])
        assert result.exit_code == 0, (args, result.output)


def test_usage_error_exits_2() -> None:
    result = invoke(["logs", "echo", "--tail", "-3"])
    assert result.exit_code == 2
    result = invoke(["nosuchcommand"])
    assert result.exit_code == 2
