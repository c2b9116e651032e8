"""The drain before a node stops: what lets a balancer without retries (a Kubernetes Service,
a health-checking balancer) restart nodes with no failed request.

From SIGTERM until nothing of the relay's has been in flight for ``server.drain_quiet``,
``/health`` answers ``503 {"status":"draining"}`` (at accept time, and behind Hypercorn on a
keep-alive connection) while the listener stays open and serves every request as usual; then
the listener closes and the daemon stops. A daemon idle that long when told to stop does not
wait.

When the drain ended is read from the daemon's own log line ("drained (...)", stamped with the
wall clock to the millisecond), so that what is timed is the drain, not the models' stop after
it. Each node here has a ``drain_quiet`` of QUIET: a drain that ran (at least QUIET after the
last request) and one that was skipped (a few milliseconds) are seconds apart.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import httpx
import trio

from tests.support.config import daemon_config, echo_cmd
from tests.support.daemon import DaemonProcess
from tests.support.http import chat, sse_lines

# 20 tokens 50 ms apart: the stream in flight lasts ~1 s after the stop.
SLOW = ("--tokens", "20", "--token-delay", "0.05")
# Fifteen times the default (0.1 s): far from both a skipped drain and the scheduling noise of
# a loaded machine.
QUIET = 1.5
# How much earlier than the client the daemon may see a request end (it logs the drain's end
# from then on): the last bytes' way through loopback and this test's own wake-up.
CLIENT_LAG = 0.2


def _daemon(
    tmp_path: Path, spawn: Callable[..., DaemonProcess], *, quiet: float = QUIET
) -> DaemonProcess:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    config, url = daemon_config(
        tmp_path / "node.toml",
        state_dir,
        {"slow": {"cmd": echo_cmd(*SLOW)}, "quick": {"cmd": echo_cmd()}},
        server={"shutdown_grace": 20, "drain_quiet": quiet},
    )
    return spawn(config, url)


def _drained_at(daemon: DaemonProcess) -> float:
    """When the daemon logged the end of its drain (wall clock, as ``time.time()``)."""
    lines = [line for line in daemon.stderr().splitlines() if " drained (" in line]
    assert len(lines) == 1, daemon.stderr()
    stamp = datetime.strptime(lines[0][:23], "%Y-%m-%d %H:%M:%S,%f")
    return stamp.timestamp()


def _fresh_connections(url: str) -> httpx.AsyncClient:
    """A client that asks each request on a new connection: /health is then answered by the
    listener at accept time, as a balancer's probe is."""
    limits = httpx.Limits(max_keepalive_connections=0)
    return httpx.AsyncClient(base_url=url, timeout=5, trust_env=False, limits=limits)


async def _draining_health(url: str) -> httpx.Response:
    """/health on new connections, until it no longer says 200 (the stop was just sent)."""
    async with _fresh_connections(url) as fresh:
        with trio.fail_after(5):
            while (health := await fresh.get("/health")).status_code == 200:
                await trio.sleep(0.01)
    return health


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

            # The balancer's probe: 503 draining, from the listener (a skipped drain closes
            # it: no answer at all)...
            health = await _draining_health(daemon.url)
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
            ended_at = time.time()
            # Still draining: nothing has been in flight for less than QUIET.
            async with _fresh_connections(daemon.url) as fresh:
                health = await fresh.get("/health")
            assert (health.status_code, health.json()) == (503, {"status": "draining"})
    # Then, with nothing in flight for QUIET, the listener closes and the daemon exits cleanly.
    code = await trio.to_thread.run_sync(daemon.wait)
    assert code == 0, daemon.stderr()
    assert "drained (no request in flight)" in daemon.stderr()
    drained = _drained_at(daemon) - ended_at
    assert QUIET - CLIENT_LAG <= drained < QUIET + 3, (drained, daemon.stderr())


def test_an_idle_node_stops_at_once(
    tmp_path: Path, spawn_daemon: Callable[..., DaemonProcess]
) -> None:
    daemon = _daemon(tmp_path, spawn_daemon)
    daemon.load("quick")
    answer = httpx.post(f"{daemon.url}/v1/chat/completions", json=chat("quick"), timeout=10)
    assert answer.status_code == 200
    # The behaviour under test: the node stays idle for longer than its drain's quiet period.
    time.sleep(QUIET + 0.3)
    stopping = time.time()
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.wait() == 0
    assert "drained (no request in flight)" in daemon.stderr()
    # No drain to wait for: a drain would have lasted QUIET, a skipped one takes the time the
    # signal takes to be handled.
    drained = _drained_at(daemon) - stopping
    assert drained < QUIET / 2, (drained, daemon.stderr())


async def test_drain_quiet_keeps_a_just_used_node_draining_that_long(
    tmp_path: Path, spawn_daemon: Callable[..., DaemonProcess]
) -> None:
    """``server.drain_quiet``: for a balancer slower to notice the 503 than the default. A
    node whose last request has just ended drains for that long, with nothing in flight."""
    quiet = 2 * QUIET
    daemon = _daemon(tmp_path, spawn_daemon, quiet=quiet)
    daemon.load("quick")
    async with httpx.AsyncClient(base_url=daemon.url, timeout=10, trust_env=False) as client:
        answer = await client.post("/v1/chat/completions", json=chat("quick"))
        assert answer.status_code == 200
        answered_at = time.time()
        daemon.proc.send_signal(signal.SIGTERM)
        health = await _draining_health(daemon.url)
        assert (health.status_code, health.json()) == (503, {"status": "draining"})
    assert await trio.to_thread.run_sync(daemon.wait) == 0
    drained = _drained_at(daemon) - answered_at
    assert quiet - CLIENT_LAG <= drained < quiet + 3, (drained, daemon.stderr())
