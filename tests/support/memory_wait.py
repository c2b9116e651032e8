"""A daemon subprocess whose memory budget is full, and a model waiting for it: for what
``trioserve status`` and the status page show of budgets, figures and waiting reasons.

Budget ``cpu = 400 MiB``. ``p`` (pinned, preloaded) and ``a`` declare 150 MiB each, so ``b``
(150 MiB) fits only once ``a`` stops; while a request keeps ``a`` busy it never does
(``swap_after`` is long), and ``b`` waits. ``u`` declares nothing and has never run: its memory
is not known. Each model runs a command of its own (``--model-name``), so no two share
measured figures.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from tests.support.config import daemon_config, echo_cmd
from tests.support.daemon import DaemonHandle
from tests.support.http import chat, raw_address, raw_post

__all__ = ["MIB", "memory_daemon", "model_waits"]

MIB = 2**20


def _echo(name: str, *options: str) -> list[str]:
    return echo_cmd("--model-name", name, *options)


def memory_daemon(tmp_path: Path, spawn_daemon: Callable[..., DaemonHandle]) -> DaemonHandle:
    """The daemon above, healthy, its preloaded ``p`` ready."""
    models: dict[str, dict[str, Any]] = {
        "p": {"cmd": _echo("p"), "memory": "150 MiB", "pinned": True, "preload": True},
        # Slow: one streamed request keeps it busy for 50 s.
        "a": {"cmd": _echo("a", "--token-delay", "0.5", "--tokens", "100"), "memory": "150 MiB"},
        "b": {"cmd": _echo("b"), "memory": "150 MiB"},
        "u": {"cmd": _echo("u")},
    }
    config, url = daemon_config(
        tmp_path / "memory.toml",
        tmp_path / "state",
        models,
        # max_loaded well above the three that may run: only memory holds b back.
        supervisor={"memory": {"cpu": "400 MiB"}, "swap_after": 600, "max_loaded": 4},
    )
    daemon = spawn_daemon(config, url)
    daemon.wait_status(lambda status: status["models"]["p"]["state"] == "ready", timeout=20)
    return daemon


@contextmanager
def model_waits(daemon: DaemonHandle) -> Iterator[dict[str, Any]]:
    """``a`` loaded and busy with a streamed request, and a request to ``b`` waiting for
    memory; yields the status once ``b`` waits. Both connections are closed at the end (the
    daemon cancels their requests)."""
    daemon.load("a")
    with ExitStack() as stack:
        busy = stack.enter_context(socket.create_connection(raw_address(daemon.url)))
        busy.sendall(raw_post(chat("a", stream=True)))
        daemon.wait_status(lambda status: status["models"]["a"]["in_flight"] == 1, timeout=20)
        waiting = stack.enter_context(socket.create_connection(raw_address(daemon.url)))
        waiting.sendall(raw_post(chat("b")))
        yield daemon.wait_status(
            lambda status: (status["models"]["b"]["waiting_for"] or "").startswith(
                "waiting for memory"
            ),
            timeout=20,
        )
