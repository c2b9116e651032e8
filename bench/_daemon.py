"""Shared by the benchmarks that start ``trioserve`` as their own process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def wait_healthy(url: str, daemon: subprocess.Popen[bytes], limit: float = 30) -> None:
    """Until ``url``/health answers 200; exits the benchmark if the daemon dies or is slow.
    (Polling is the honest tool here: the daemon is another process with no ready signal.)"""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise SystemExit(f"the daemon exited with {daemon.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"the daemon did not become healthy within {limit:g} s")


@contextmanager
def daemon_process(config: Path, log: Path, url: str) -> Iterator[subprocess.Popen[bytes]]:
    """``trioserve start --config CONFIG`` (next to this interpreter), its output in ``log``,
    healthy at ``url``; SIGTERM on exit (SIGKILL after 30 s), always waited for. The
    environment's TRIOSERVE_* and NOTIFY_* variables are left out: they would steer it."""
    trioserve = Path(sys.executable).with_name("trioserve")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRIOSERVE_", "NOTIFY"))}
    with log.open("wb") as out:
        daemon = subprocess.Popen(
            [str(trioserve), "start", "--config", str(config), "--log-level", "warning"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=env,
        )
    try:
        wait_healthy(url, daemon)
        yield daemon
    finally:
        daemon.terminate()
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
