"""``trioserve status`` on memory placement, through typer's CliRunner against a real daemon in
a thread of the test's process: the MEMORY column, pinned and preload in the STATE column, the
devices' budgets, and a line per waiting model and per warning."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tests.support.cli import invoke
from tests.support.config import daemon_config, echo_cmd
from tests.support.memory_wait import MIB, memory_daemon, model_waits
from trioserve.sizes import format_size

HEADER = [
    *("MODEL", "STATE", "PID", "PORT", "IN-FLIGHT", "QUEUED", "UPTIME", "RESTARTS"),
    *("MEMORY", "LAST", "ERROR"),
]
MEASURED = r"cpu \d+\.\d MiB"  # what an echo child measures varies from run to run


def status_lines(url: str) -> list[str]:
    result = invoke(["status", "--url", url])
    assert result.exit_code == 0, result.output
    return [line.rstrip() for line in result.stdout.splitlines()]


def model_line(lines: list[str], name: str) -> str:
    [line] = [line for line in lines if line.startswith(f"{name} ")]
    return line


def test_status_shows_memory_budgets_and_why_a_model_waits(
    tmp_path: Path, threaded_daemon: Any
) -> None:
    daemon = memory_daemon(tmp_path, threaded_daemon)
    with model_waits(daemon) as status:
        lines = status_lines(daemon.url)
        as_json = json.loads(invoke(["status", "--json", "--url", daemon.url]).stdout)
    assert lines[1].split() == HEADER
    # The pinned, preloaded model says so; running models show what was measured of them.
    assert re.search(rf"^p +ready \(pinned, preload\) .* 0 +{MEASURED} +-$", model_line(lines, "p"))
    assert re.search(rf"^a +ready .* 0 +{MEASURED} +-$", model_line(lines, "a"))
    # Never run (b waits to start): its declared size, or nothing at all.
    assert re.search(r"^b +starting .* 0 +cpu 150\.0 MiB +-$", model_line(lines, "b"))
    assert model_line(lines, "u").split()[-2:] == ["-", "-"]
    # Each budgeted device: budget, what p and a hold (their declared sizes), what is left.
    header = lines.index(next(line for line in lines if line.startswith("DEVICE")))
    assert lines[header].split() == ["DEVICE", "BUDGET", "USED", "FREE"]
    assert lines[header + 1].split() == ["cpu", "400.0", "MiB", "300.0", "MiB", "100.0", "MiB"]
    waiting = status["models"]["b"]["waiting_for"]
    assert waiting.startswith("waiting for memory: needs 150.0 MiB on cpu, 100.0 MiB free")
    assert f"b: {waiting}" in lines
    assert (
        "u: memory not yet known: counted as 0 until measured "
        "(its command names no .gguf to estimate from)"
    ) in lines
    # --json stays the daemon's whole answer, budgets included.
    assert as_json["devices"] == {
        "cpu": {"budget": 400 * MIB, "used": 300 * MIB, "free": 100 * MIB}
    }


def test_status_warns_of_a_model_measured_over_its_declared_size(
    tmp_path: Path, threaded_daemon: Any
) -> None:
    models: dict[str, dict[str, Any]] = {
        "small": {"cmd": echo_cmd("--model-name", "small"), "memory": "1 MiB"},
        "idle": {"cmd": echo_cmd("--model-name", "idle")},
    }
    config, url = daemon_config(tmp_path / "c.toml", tmp_path / "state", models)
    daemon = threaded_daemon(config, url)
    daemon.load("small")
    measured = daemon.status()["models"]["small"]["memory"]["measured"]["cpu"]
    lines = status_lines(url)
    assert model_line(lines, "small").split()[-4:-1] == ["cpu", *format_size(measured).split()]
    [warning] = [line for line in lines if line.startswith("small: ")]
    assert re.fullmatch(
        r"small: measured [\d.]+ MiB on cpu, \d+% over the 1\.0 MiB declared: "
        r"the measured figure is used",
        warning,
    )
    # No budgets: no devices table, and a memory nobody knows yet places nothing, so the
    # daemon's note about it is left out.
    assert not any(line.startswith(("DEVICE", "idle: ")) for line in lines)
