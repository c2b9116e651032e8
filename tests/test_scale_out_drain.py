"""The drain before a node stops: what lets a balancer without retries (a Kubernetes Service,
a health-checking balancer) restart nodes with no failed request.

From SIGTERM until nothing of the relay's has been in flight for a moment, ``/health``
answers ``503 {"status":"draining"}`` (at accept time, and behind Hypercorn on a keep-alive
connection) while the listener stays open and serves every request as usual; then the
listener closes and the daemon stops. A daemon idle when told to stop does not wait.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import trio

from tests.support.config import daemon_config, echo_cmd
from tests.support.daemon import DaemonProcess
from tests.support.http import chat, sse_lines

# 20 tokens 50 ms apart: the stream in flight lasts ~1 s after the stop.
SLOW = ("--tokens", "20", "--token-delay", "0.05")


def _daemon(tmp_path: Path, spawn: Callable[..., DaemonProcess]) -> DaemonProcess:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    config, url = daemon_config(
        tmp_path / "node.toml",
        state_dir,
        {"slow": {"cmd": echo_cmd(*SLOW)}, "quick": {"cmd": echo_cmd()}},
        server={"shutdown_grace": 10},
    )
    return spawn(config, url)


async def _fresh_health(url: str) -> httpx.Response:
    """GET /health on a new connection (answered by the listener at accept time)."""
    async with httpx.AsyncClient(base_url=url, timeout=5, trust_env=False) as fresh:
        return await fresh.get("/health")


async def test_a_stopping_node_says_draining_and_serves_until_its_requests_are_done(
    tmp_path: Path, spawn_daemon: Callable[..., DaemonProcess]
) -> None:
    daemon = _daemon(tmp_path, spawn_daemon)
    daemon.load("slow")
    daemon.load("quick")
    limits = httpx.Limits(max_connections=1)  # the same keep-alive connection throughout
    async with (
        httpx.AsyncClient(base_url=daemon.url, timeout=10, trust_env=False) as streaming,
        httpx.AsyncClient(
            base_url=daemon.url, timeout=10, trust_env=False, limits=limits
        ) as kept_alive,
    ):
        assert (await kept_alive.get("/v1/models")).status_code == 200
        async with streaming.stream(
            "POST", "/v1/chat/completions", json=chat("slow", stream=True)
        ) as stream:
            lines = sse_lines(stream)
            first = await lines.__anext__()
            assert first.startswith("data: {"), first
            daemon.proc.send_signal(signal.SIGTERM)

            # The balancer's probe: 503 draining, from the listener...
            with trio.fail_after(5):
                while (health := await _fresh_health(daemon.url)).status_code == 200:
                    await trio.sleep(0.01)
            assert health.status_code == 503, health.text
            assert health.json() == {"status": "draining"}
            # ... and from the app, on a connection Hypercorn already serves.
            kept = await kept_alive.get("/health")
            assert (kept.status_code, kept.json()) == (503, {"status": "draining"})
            # A request the balancer sends before it noticed is still served, not refused.
            for client in (kept_alive, streaming):
                answer = await client.post("/v1/chat/completions", json=chat("quick"))
                assert answer.status_code == 200, answer.text
            # The stream in flight runs to its end.
            rest = [line async for line in lines]
            assert rest[-1] == "data: [DONE]", rest[-3:]
            ended_at = time.monotonic()
    # Then, with nothing in flight, the listener closes and the daemon exits cleanly.
    code = await trio.to_thread.run_sync(daemon.wait)
    assert code == 0, daemon.stderr()
    assert time.monotonic() - ended_at < 3, daemon.stderr()
    assert "drained (no request in flight)" in daemon.stderr()


def test_an_idle_node_stops_at_once(
    tmp_path: Path, spawn_daemon: Callable[..., DaemonProcess]
) -> None:
    daemon = _daemon(tmp_path, spawn_daemon)
    daemon.load("quick")
    answer = httpx.post(f"{daemon.url}/v1/chat/completions", json=chat("quick"), timeout=10)
    assert answer.status_code == 200
    time.sleep(0.2)  # longer than the drain's quiet period: the node is idle
    stopping = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.wait() == 0
    # No drain to wait for: shutdown_grace is 10 s, this is the models' stop alone.
    assert time.monotonic() - stopping < 2.5, daemon.stderr()


def test_drain_quiet_keeps_a_just_used_node_draining_that_long(
    tmp_path: Path, spawn_daemon: Callable[..., DaemonProcess]
) -> None:
    """``server.drain_quiet``: for a balancer slower to notice the 503 than the default."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    config, url = daemon_config(
        tmp_path / "node.toml",
        state_dir,
        {"quick": {"cmd": echo_cmd()}},
        server={"shutdown_grace": 20, "drain_quiet": 4},
    )
    daemon = spawn_daemon(config, url)
    daemon.load("quick")
    answer = httpx.post(f"{url}/v1/chat/completions", json=chat("quick"), timeout=10)
    assert answer.status_code == 200
    stopping = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    time.sleep(1.0)  # ten times the default quiet period: without the key, the port is closed
    health = httpx.get(f"{url}/health", timeout=5, trust_env=False)
    assert (health.status_code, health.json()) == (503, {"status": "draining"})
    assert daemon.wait() == 0
    assert time.monotonic() - stopping >= 4 - 0.5, daemon.stderr()
