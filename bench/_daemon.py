"""Shared by the benchmarks that start ``trioserve`` as their own process."""

from __future__ import annotations

import subprocess
import time

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
