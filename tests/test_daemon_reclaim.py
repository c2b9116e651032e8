"""`trioserve start` after a SIGKILLed daemon: it reclaims the leftovers (and their ports) before
it binds, and logs what it did. Also: the state store after a clean stop."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support.config import daemon_config, echo_cmd
from tests.support.ports import bindable
from tests.support.ports import port_range as take_port_range
from tests.support.processes import processes_of_state_dir
from trioserve.host.store import StateStore


def free_pair() -> int:
    """``p`` such that ``p`` and ``p + 1`` are free right now, from this test's own range.

    Free as the port allocator sees it (a bind without SO_REUSEADDR): not even in TIME_WAIT,
    which an echo backend stopped by an earlier test leaves behind for a minute.
    """
    first, last = take_port_range(40)
    for port in range(first, last):
        if all(bindable(p) for p in (port, port + 1)):
            return port
    raise AssertionError(f"no two free ports in [{first}, {last}]")


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
def test_new_start_reclaims_leftovers_and_their_ports(tmp_path: Path, spawn_daemon: Any) -> None:
    # Exactly two ports for two models: the new daemon can only load both if it got back the
    # ports the leftovers held.
    first = free_pair()
    config, url = daemon_config(
        tmp_path / "c.toml",
        tmp_path / "state",
        {"alpha": {"cmd": echo_cmd()}, "beta": {"cmd": echo_cmd()}},
        supervisor={"port_range": [first, first + 1]},
    )
    old = spawn_daemon(config, url)
    old_instance = old.status()["instance"]
    leftovers = {}
    for name in ("alpha", "beta"):
        entry = old.load(name)
        leftovers[name] = (old.status()["models"][name]["pid"], entry["port"])
    assert {port for _, port in leftovers.values()} == {first, first + 1}
    # With its guard: a daemon SIGKILLed alone has its models stopped by the guard.
    old.kill_with_its_guard()
    assert all(running(pid) for pid, _ in leftovers.values())

    new = spawn_daemon(config, url)
    # Reclaimed before it answered /health.
    assert not any(running(pid) for pid, _ in leftovers.values())
    # /health answers as soon as the socket is bound; the "listening on" line follows.
    deadline = time.monotonic() + 10
    while "listening on" not in (log := new.stderr()):
        assert time.monotonic() < deadline, log
        time.sleep(0.05)
    for name, (pid, port) in leftovers.items():
        pattern = (
            rf"WARNING trioserve: startup cleanup: {name} pid {pid} "
            rf"\(port {port}, instance {old_instance}\): killed"
        )
        assert re.search(pattern, log), log
    # And it logged that before it was listening.
    assert log.index("startup cleanup") < log.index("listening on")

    ports = {new.load(name)["port"] for name in ("alpha", "beta")}
    assert ports == {first, first + 1}
    rows = StateStore(tmp_path / "state").children()
    old_rows = [row for row in rows if row.instance == old_instance]
    assert sorted(row.state for row in old_rows) == ["reclaimed", "reclaimed"]
    assert all(row.stopped_at is not None for row in old_rows)


def test_clean_stop_leaves_a_clean_store(tmp_path: Path, spawn_daemon: Any) -> None:
    config, url = daemon_config(tmp_path / "c.toml", tmp_path / "state")
    daemon = spawn_daemon(config, url)
    daemon.load("echo")
    instance = daemon.status()["instance"]
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.wait() == 0
    store = StateStore(tmp_path / "state")
    # Every child's final state was written before the daemon exited, and the daemon's own.
    assert [(row.model, row.state) for row in store.children()] == [("echo", "stopped")]
    assert store.children(live_only=True) == []
    [row] = [row for row in store.daemons() if row.instance == instance]
    assert row.stopped_at is not None and row.url == url
    assert processes_of_state_dir(tmp_path) == []
