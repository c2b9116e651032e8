"""The README figure: time from the daemon's SIGKILL to the last model process gone.

Run with ``.venv/bin/python bench/guard_daemon.py`` (``--rounds``, ``--grace``). Each round starts
a real ``trioserve start`` with two models, ``stop_grace`` = 0.5 s by default: ``stubborn`` (a
small HTTP server that ignores SIGTERM, so only the SIGKILL after the grace ends it) and ``echo``
(the built-in echo backend, which dies on SIGTERM). It loads both, SIGKILLs the daemon, and takes
the moment the last model process ended from pidfds: the process table, not the guard's word.
This script makes itself the subreaper of the orphans (``tests/support/guard_parent.py``'s
``Adopter``), so it reaps them and checks how each one died and that the guard exited by itself.

Prints the median, min and max over the rounds, and for the echo model alone (what SIGTERM
costs: the guard noticing the death and acting); exit status 1 when a round missed
``stop_grace`` + 0.5 s or left a model process alive.
"""

from __future__ import annotations

import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil

from tests.support.config import daemon_config, echo_cmd, health_server_cmd
from tests.support.daemon import DaemonProcess
from tests.support.guard_parent import Adopter, Exits, bench_arguments
from tests.support.processes import model_processes

BOUND = 0.5  # the goal: every model process gone within stop_grace + 0.5 s
MODELS = {
    "stubborn": {"cmd": health_server_cmd("--ignore-sigterm")},
    "echo": {"cmd": echo_cmd()},
}


def guard_of(daemon: int) -> int:
    for child in psutil.Process(daemon).children():
        if "trioserve.host.guard" in " ".join(child.cmdline()):
            return child.pid
    raise SystemExit(f"daemon {daemon} has no guard process")


def one_round(directory: Path, grace: float, adopter: Adopter) -> tuple[float, float] | str:
    """(seconds from the SIGKILL to the last model process gone, to the echo model gone), or
    what went wrong."""
    config, url = daemon_config(
        directory / "trioserve.toml",
        directory / "state",
        MODELS,
        supervisor={"stop_grace": grace, "max_loaded": 2},
    )
    daemon = DaemonProcess.start(config, url, directory / "daemon.log")
    pids: list[int] = []
    try:
        daemon.wait_healthy()
        for model in MODELS:
            daemon.load(model)
        status = daemon.status()
        by_model = model_processes(status["instance"], root=daemon.pid)
        pids = [pid for group in by_model.values() for pid in group]
        if sorted(by_model) != sorted(MODELS):
            return f"model processes: {by_model}"
        guard = guard_of(daemon.pid)
        with Exits([*pids, guard]) as exits:
            killed_at = time.monotonic()
            daemon.proc.send_signal(signal.SIGKILL)
            daemon.proc.wait()
            exits.wait(grace + 10, on_exit=adopter.reap)
        if not set(pids) <= set(exits.ended):
            return f"model processes survived: {sorted(set(pids) - set(exits.ended))}"
        if adopter.statuses.get(guard) != 0:
            return f"the guard ended with wait status {adopter.statuses.get(guard)}"
        for pid in by_model["stubborn"]:
            status_of = adopter.statuses.get(pid)
            if status_of is None or os.WTERMSIG(status_of) != signal.SIGKILL:
                return f"stubborn pid {pid} ended with wait status {status_of}, not SIGKILL"
        last = max(exits.ended[pid] for pid in pids) - killed_at
        echo = max(exits.ended[pid] for pid in by_model["echo"]) - killed_at
        return last, echo
    finally:
        daemon.stop()
        adopter.cleanup(pids)


def main() -> int:
    args = bench_arguments(__doc__.splitlines()[0])
    last: list[float] = []
    echo: list[float] = []
    with Adopter() as adopter, tempfile.TemporaryDirectory(prefix="guard-daemon-") as tmp:
        for n in range(args.rounds):
            directory = Path(tmp) / f"round-{n}"
            directory.mkdir()
            outcome = one_round(directory, args.grace, adopter)
            if isinstance(outcome, str):
                print(f"round {n}: {outcome}")
                return 1
            last.append(outcome[0] * 1000)
            echo.append(outcome[1] * 1000)
    print(
        f"trioserve start, 2 models (one ignoring SIGTERM, one echo), stop_grace {args.grace:g} s,"
        f" {args.rounds} rounds: last model process gone {statistics.median(last):.0f} ms after "
        f"the daemon's SIGKILL (median; min {min(last):.0f}, max {max(last):.0f})"
    )
    print(
        f"  the echo model (dies on SIGTERM) alone: {statistics.median(echo):.0f} ms (median; "
        f"min {min(echo):.0f}, max {max(echo):.0f})"
    )
    return 0 if max(last) <= (args.grace + BOUND) * 1000 else 1


if __name__ == "__main__":
    sys.exit(main())
