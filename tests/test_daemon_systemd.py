"""systemd notify end to end: the test is systemd's side of NOTIFY_SOCKET, and the real daemon
runs as `trioserve start` in a subprocess.

READY=1 once listening (after the startup cleanup), STATUS= with model counts, WATCHDOG=1 every
WATCHDOG_USEC / 2, STOPPING=1 once SIGTERM arrives; nothing without NOTIFY_SOCKET; children
never see the variables.
"""

from __future__ import annotations

import itertools
import signal
import statistics
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support.config import daemon_config
from tests.support.daemon import clean_env
from tests.support.notify import NotifyPeer

WATCHDOG_USEC = 400_000
PERIOD = WATCHDOG_USEC / 2 / 1_000_000


@pytest.mark.quiet  # the pings' pace, to a 0.4 s bound
def test_ready_status_watchdog_stopping_in_order(
    tmp_path: Path, spawn_daemon: Any, peer: NotifyPeer
) -> None:
    config, url = daemon_config(tmp_path / "c.toml", tmp_path / "state")
    env = clean_env(NOTIFY_SOCKET=peer.notify_socket, WATCHDOG_USEC=str(WATCHDOG_USEC))
    daemon = spawn_daemon(config, url, env=env)
    peer.collect_until("READY=1")
    # READY came once the listener was bound: /health answered before we got here, and READY is
    # the very first message.
    assert peer.messages[0] == "READY=1\nSTATUS=0 of 1 models ready; 1 stopped"

    daemon.load("echo")
    peer.collect_until("STATUS=1 of 1 models ready; 1 ready")
    # Arrival times are only send times while the test sits in recv(): measure from here.
    watched = len(peer.received)
    peer.collect(8 * PERIOD)  # the pings of eight periods: what is measured
    pings = [t for t, m in peer.received[watched:] if m == "WATCHDOG=1"]

    # Children get neither the socket nor the watchdog settings.
    status = daemon.status()
    child = psutil.Process(status["models"]["echo"]["pid"])
    child_env = child.environ()
    assert child_env.get("TRIOSERVE_INSTANCE") == status["instance"], (
        child.status(),
        status,
        daemon.stderr(),
    )
    assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"} & set(child_env)

    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.wait() == 0
    peer.collect_queued()  # it exited: all it sent is queued

    messages = peer.messages
    stopping = [i for i, m in enumerate(messages) if m.split("\n")[0] == "STOPPING=1"]
    assert len(stopping) == 1, messages
    assert messages[stopping[0]] == "STOPPING=1\nSTATUS=stopping: draining requests, then models"
    assert messages.count("READY=1\nSTATUS=0 of 1 models ready; 1 stopped") == 1
    # Everything before STOPPING: READY first, then pings and status lines, nothing else.
    before = messages[1 : stopping[0]]
    assert all(m == "WATCHDOG=1" or m.startswith("STATUS=") for m in before), before
    after = messages[stopping[0] + 1 :]
    assert all(m == "WATCHDOG=1" or m.startswith("STATUS=") for m in after), after

    # Pings at about WATCHDOG_USEC / 2 (200 ms).
    assert len(pings) >= 5, messages
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert PERIOD * 0.6 < statistics.median(gaps) < PERIOD * 1.6, gaps
    assert max(gaps) < WATCHDOG_USEC / 1_000_000, gaps  # systemd would not have fired


def test_nothing_is_sent_without_notify_socket(
    tmp_path: Path, spawn_daemon: Any, peer: NotifyPeer
) -> None:
    config, url = daemon_config(tmp_path / "c.toml", tmp_path / "state")
    # WATCHDOG_USEC alone means nothing: there is nowhere to send to.
    daemon = spawn_daemon(config, url, env=clean_env(WATCHDOG_USEC=str(WATCHDOG_USEC)))
    daemon.load("echo")
    child = psutil.Process(daemon.status()["models"]["echo"]["pid"])
    assert "WATCHDOG_USEC" not in child.environ()
    peer.collect(3 * PERIOD)  # three watchdog periods in which a ping would be due
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.wait() == 0
    peer.collect_queued()  # it exited: all it sent is queued
    assert peer.messages == []
    assert "sd_notify" not in daemon.stderr()
