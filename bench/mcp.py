"""Issue 23's figures: the MCP endpoint under load, against the same daemon's ``/v1``.

trioserve runs as its own process (``trioserve start``) with the echo backend under three
names: ``tiny`` (answers at once), ``slow`` (``--token-delay``: each call takes about
``--call-seconds``, ``max_concurrency = 64``) and ``stream`` (a few tokens a second, for the
16 calls that generate while pings are timed). The clients are the official SDK's
(``ClientSession`` over Streamable HTTP, protocol 2025-11-25) in this process, under trio.

Figures:
- ``ping`` p50 / p99 idle, and while 16 ``chat`` calls generate (goal p99 <= 10 ms, and <= 2x
  idle);
- 50 concurrent ``chat`` calls of ``--call-seconds`` each to ``slow``: wall time (goal <= 1.05x
  one call), with the SDK's client and with a raw HTTP one (the SDK client's own CPU for the
  50 calls is about the daemon's, and it runs in this one process);
- a ``chat`` call's added latency over the same request on ``/v1/chat/completions`` (one
  token, ``tiny``; p50s compared, the kinds interleaved; goal <= 3 ms), with the SDK's client
  and with a raw HTTP one: the SDK's client closes the connection after each answer's
  result event (before the end of its SSE body), so each of its calls also opens a TCP
  connection; the raw one reads the answer to its end and keeps the connection;
- a cancelled call (``notifications/cancelled``, sent by the SDK when the call's scope is
  cancelled): from the cancel to the echo backend counting the generation cancelled (``/stats``
  polled every 2 ms: an upper bound);
- the daemon's RSS per open idle session (200 sessions opened, RSS before and after).

    .venv/bin/python bench/mcp.py [--rounds 200] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

# Run as `python bench/mcp.py`, this file's folder comes first on sys.path, and this file would
# be imported as the SDK's `mcp`: the folder is taken off while the SDK is imported.
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or ".") != _HERE]

import httpx  # noqa: E402
import httpx2  # noqa: E402
import trio  # noqa: E402
from mcp import ClientSession  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _daemon import wait_healthy  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.admin import AdminAuth  # noqa: E402
from tests.support.ports import free_port  # noqa: E402

TRIOSERVE = str(Path(sys.executable).parent / "trioserve")
ECHO = '["{python}", "-m", "trioserve.backends.echo", "--port", "{port}"'


def _config(state_dir: str, port: int, call_seconds: float) -> str:
    # 20 tokens per slow call: the token delay makes the call last call_seconds.
    slow_delay = call_seconds / 20
    return "\n".join(
        [
            "[server]",
            f"port = {port}",
            f'state_dir = "{state_dir}/state"',
            "[supervisor]",
            "max_loaded = 3",
            "port_range = [23100, 23199]",
            "[mcp]",
            "max_sessions = 1000",
            "[models.tiny]",
            f"cmd = {ECHO}]",
            "max_concurrency = 64",
            "[models.slow]",
            f'cmd = {ECHO}, "--token-delay", "{slow_delay}", "--tokens", "20"]',
            "max_concurrency = 64",
            "[models.stream]",
            f'cmd = {ECHO}, "--token-delay", "0.05", "--tokens", "100000"]',
            "max_concurrency = 64",
        ]
    )


@asynccontextmanager
async def mcp_session(url: str) -> AsyncIterator[ClientSession]:
    http = httpx2.AsyncClient(timeout=httpx2.Timeout(60, read=600))
    async with (
        http,
        streamable_http_client(url + "/mcp", http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


def _ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


Progress = float | None


async def _pings(session: ClientSession, rounds: int) -> list[float]:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        await session.send_ping()
        samples.append(time.perf_counter() - start)
        await trio.sleep(0.005)
    return samples


_HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
_VERSION = "2025-11-25"


class RawPinger:
    """``ping`` over a keep-alive HTTP/1.1 connection with a light client: what the server
    takes, without the SDK client's own cost (about as much again, on this machine)."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http
        self.headers = dict(_HEADERS)

    async def open(self) -> None:
        hello = {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": _VERSION,
                "capabilities": {},
                "clientInfo": {"name": "bench", "version": "0"},
            },
        }
        answer = await self.http.post("/mcp", json=hello, headers=self.headers)
        answer.raise_for_status()
        self.headers |= {
            "mcp-session-id": answer.headers["mcp-session-id"],
            "mcp-protocol-version": _VERSION,
        }
        ready = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        (await self.http.post("/mcp", json=ready, headers=self.headers)).raise_for_status()

    async def call_tool(self, request_id: int, name: str, arguments: dict[str, Any]) -> None:
        """A ``tools/call``, its SSE answer read to its end (the connection is kept)."""
        body = {
            "jsonrpc": "2.0",
            "id": request_id,
            "method": "tools/call",
            "params": {"name": name, "arguments": arguments},
        }
        answer = await self.http.post("/mcp", json=body, headers=self.headers)
        assert '"result"' in answer.text and '"isError":false' in answer.text, answer.text

    async def pings(self, rounds: int) -> list[float]:
        samples = []
        for i in range(rounds):
            body = {"jsonrpc": "2.0", "id": i + 1, "method": "ping"}
            start = time.perf_counter()
            answer = await self.http.post("/mcp", json=body, headers=self.headers)
            samples.append(time.perf_counter() - start)
            assert '"result"' in answer.text, answer.text
            await trio.sleep(0.005)
        return samples


async def ping_figures(url: str, rounds: int) -> dict[str, float]:
    async with (
        mcp_session(url) as pinger,
        httpx.AsyncClient(base_url=url, trust_env=False, timeout=30) as http,
    ):
        raw = RawPinger(http)
        await raw.open()
        raw_idle = await raw.pings(rounds)
        idle = await _pings(pinger, rounds)
        async with AsyncExitStack() as stack:
            callers = [await stack.enter_async_context(mcp_session(url)) for _ in range(16)]
            generating = trio.Event()
            seen = 0

            async def on_progress(progress: float, total: Progress, message: str | None) -> None:
                nonlocal seen
                seen += 1
                if seen >= 16:
                    generating.set()

            async with trio.open_nursery() as nursery:
                for caller in callers:
                    nursery.start_soon(_long_call, caller, on_progress)
                with trio.fail_after(60):
                    await generating.wait()
                busy = await _pings(pinger, rounds)
                raw_busy = await raw.pings(rounds)
                nursery.cancel_scope.cancel()
    return {
        "idle_p50_ms": _ms(idle, 0.5),
        "idle_p99_ms": _ms(idle, 0.99),
        "busy_p50_ms": _ms(busy, 0.5),
        "busy_p99_ms": _ms(busy, 0.99),
        "raw_idle_p50_ms": _ms(raw_idle, 0.5),
        "raw_idle_p99_ms": _ms(raw_idle, 0.99),
        "raw_busy_p50_ms": _ms(raw_busy, 0.5),
        "raw_busy_p99_ms": _ms(raw_busy, 0.99),
    }


def _cpu_s(pid: int) -> float:
    """A process's CPU time so far (user + system)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def concurrent_calls(url: str, pid: int, calls: int, call_seconds: float) -> dict[str, float]:
    # One call first: the model is started, and one call's own duration is known.
    async with mcp_session(url) as session:
        start = time.perf_counter()
        await session.call_tool("chat", {"model": "slow", "prompt": "x"})
        one = time.perf_counter() - start
    ready = trio.Semaphore(0)
    go = trio.Event()
    errors = 0
    done_at: list[float] = []

    async def caller() -> None:
        nonlocal errors
        # Each session in a task of its own: opened before the clock starts.
        async with mcp_session(url) as session:
            ready.release()
            await go.wait()
            result = await session.call_tool("chat", {"model": "slow", "prompt": "x"})
            done_at.append(time.perf_counter())
            errors += bool(result.is_error)

    async with trio.open_nursery() as nursery:
        for _ in range(calls):
            nursery.start_soon(caller)
        for _ in range(calls):
            await ready.acquire()
        start = time.perf_counter()
        daemon_cpu, client_cpu = _cpu_s(pid), time.process_time()
        go.set()
    wall = max(done_at) - start
    return {
        "one_call_s": one,
        "wall_s": wall,
        "ratio": wall / one,
        "errors": errors,
        "daemon_cpu_s": _cpu_s(pid) - daemon_cpu,
        "client_cpu_s": time.process_time() - client_cpu,
    }


async def concurrent_raw_calls(url: str, pid: int, calls: int, one: float) -> dict[str, float]:
    """As ``concurrent_calls`` with the raw HTTP client (one session per call, each on its own
    keep-alive connection): what the daemon takes, without the SDK client's own CPU."""
    limits = httpx.Limits(max_connections=2 * calls, max_keepalive_connections=2 * calls)
    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=60, limits=limits) as http:
        callers = [RawPinger(http) for _ in range(calls)]
        for caller in callers:
            await caller.open()
        done_at: list[float] = []

        async def call(caller: RawPinger) -> None:
            await caller.call_tool(1, "chat", {"model": "slow", "prompt": "x"})
            done_at.append(time.perf_counter())

        start = time.perf_counter()
        daemon_cpu, client_cpu = _cpu_s(pid), time.process_time()
        async with trio.open_nursery() as nursery:
            for caller in callers:
                nursery.start_soon(call, caller)
    wall = max(done_at) - start
    return {
        "wall_s": wall,
        "ratio": wall / one,
        "daemon_cpu_s": _cpu_s(pid) - daemon_cpu,
        "client_cpu_s": time.process_time() - client_cpu,
    }


async def added_latency(url: str, rounds: int) -> dict[str, float]:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    arguments = {"model": "tiny", "prompt": "hi", "max_tokens": 1}
    times: dict[str, list[float]] = {"v1": [], "mcp": [], "raw": []}
    async with (
        mcp_session(url) as session,
        httpx.AsyncClient(base_url=url, trust_env=False, timeout=30) as http,
    ):
        raw = RawPinger(http)
        await raw.open()
        kinds = ("v1", "mcp", "raw")
        for i in range(rounds):
            # Each kind takes each place in the round in turn.
            for kind in kinds[i % 3 :] + kinds[: i % 3]:
                start = time.perf_counter()
                if kind == "mcp":
                    await session.call_tool("chat", arguments)
                elif kind == "raw":
                    await raw.call_tool(i + 1, "chat", arguments)
                else:
                    (await http.post("/v1/chat/completions", json=body)).raise_for_status()
                times[kind].append(time.perf_counter() - start)
    v1 = _ms(times["v1"], 0.5)
    return {
        "v1_p50_ms": v1,
        "mcp_p50_ms": _ms(times["mcp"], 0.5),
        "added_p50_ms": _ms(times["mcp"], 0.5) - v1,
        "raw_mcp_p50_ms": _ms(times["raw"], 0.5),
        "raw_added_p50_ms": _ms(times["raw"], 0.5) - v1,
    }


async def cancel_to_abort(url: str, backend_port: int, runs: int) -> dict[str, float]:
    samples = []
    async with (
        mcp_session(url) as session,
        httpx.AsyncClient(trust_env=False, timeout=10) as http,
    ):

        async def cancelled() -> int:
            stats = (await http.get(f"http://127.0.0.1:{backend_port}/stats")).json()
            return int(stats["cancelled"])

        for _ in range(runs):
            before = await cancelled()
            started = trio.Event()
            on_progress = _setter(started)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_long_call, session, on_progress)
                with trio.fail_after(30):
                    await started.wait()
                cancelled_at = time.perf_counter()
                nursery.cancel_scope.cancel()
            with trio.fail_after(10):
                while await cancelled() <= before:
                    await trio.sleep(0.002)
            samples.append(time.perf_counter() - cancelled_at)
    return {"median_ms": 1000 * statistics.median(samples), "max_ms": 1000 * max(samples)}


async def _long_call(session: ClientSession, on_progress: Any) -> None:
    await session.call_tool(
        "chat",
        {"model": "stream", "prompt": "go", "max_tokens": 100000},
        progress_callback=on_progress,
    )


def _setter(event: trio.Event) -> Any:
    """A progress callback that sets ``event`` at the first notification."""

    async def on_progress(progress: float, total: Progress, message: str | None) -> None:
        event.set()

    return on_progress


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def memory_per_session(url: str, pid: int, sessions: int) -> dict[str, float]:
    before = _rss_kib(pid)
    opened = trio.Semaphore(0)
    measured = trio.Event()

    async def hold() -> None:
        async with mcp_session(url):
            opened.release()
            await measured.wait()

    async with trio.open_nursery() as nursery:
        for _ in range(sessions):
            nursery.start_soon(hold)
        for _ in range(sessions):
            await opened.acquire()
        after = _rss_kib(pid)
        measured.set()
    return {"sessions": sessions, "kib_per_session": (after - before) / sessions}


async def main_async(args: argparse.Namespace, url: str, pid: int) -> dict[str, Any]:
    with httpx.Client(base_url=url, trust_env=False, timeout=60, auth=AdminAuth(args.state)) as c:
        for name in ("tiny", "slow", "stream"):
            c.post(f"/admin/models/{name}/load").raise_for_status()
        models = c.get("/admin/status").json()["models"]
    ping = await ping_figures(url, args.rounds)
    many = await concurrent_calls(url, pid, 50, args.call_seconds)
    return {
        "ping": ping,
        "concurrent_50": many,
        "concurrent_50_raw": await concurrent_raw_calls(url, pid, 50, many["one_call_s"]),
        "added_latency": await added_latency(url, args.rounds),
        "cancel_to_upstream_abort": await cancel_to_abort(url, models["stream"]["port"], 10),
        "memory": await memory_per_session(url, pid, 200),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--call-seconds", type=float, default=2.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "bench.toml"
        conf.write_text(_config(tmp, port, args.call_seconds))
        args.state = Path(tmp) / "state"
        daemon = subprocess.Popen(
            [TRIOSERVE, "start", "--config", str(conf), "--log-level", "warning"],
            env={**os.environ, "TRIOSERVE_CONFIG": ""},
        )
        try:
            wait_healthy(url, daemon)
            result = trio.run(main_async, args, url, daemon.pid)
        finally:
            daemon.terminate()
            daemon.wait(60)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    ping, many, added = result["ping"], result["concurrent_50"], result["added_latency"]
    cancel, memory = result["cancel_to_upstream_abort"], result["memory"]
    for client, prefix in (("SDK client", ""), ("raw HTTP", "raw_")):
        idle = f"{ping[prefix + 'idle_p50_ms']:.2f} / {ping[prefix + 'idle_p99_ms']:.2f}"
        busy = f"{ping[prefix + 'busy_p50_ms']:.2f} / {ping[prefix + 'busy_p99_ms']:.2f}"
        print(f"ping p50/p99 ({client}): idle {idle} ms; 16 calls generating {busy} ms")
    print(
        f"50 concurrent {args.call_seconds:g} s calls  {many['wall_s']:.3f} s "
        f"({many['ratio']:.3f}x one call of {many['one_call_s']:.3f} s; errors {many['errors']}; "
        f"CPU daemon {many['daemon_cpu_s']:.2f} s, client {many['client_cpu_s']:.2f} s)"
    )
    raw_many = result["concurrent_50_raw"]
    print(
        f"  the same, raw HTTP client {raw_many['wall_s']:.3f} s ({raw_many['ratio']:.3f}x; "
        f"CPU daemon {raw_many['daemon_cpu_s']:.2f} s, client {raw_many['client_cpu_s']:.2f} s)"
    )
    print(
        f"chat added over /v1, p50   {added['added_p50_ms']:+.2f} ms SDK client, "
        f"{added['raw_added_p50_ms']:+.2f} ms raw HTTP (mcp {added['mcp_p50_ms']:.2f} ms, "
        f"raw {added['raw_mcp_p50_ms']:.2f} ms, /v1 {added['v1_p50_ms']:.2f} ms)"
    )
    print(
        f"cancel -> upstream aborted {cancel['median_ms']:.1f} ms median, "
        f"max {cancel['max_ms']:.1f} ms"
    )
    print(f"memory per idle session    {memory['kib_per_session']:.1f} KiB")


if __name__ == "__main__":
    main()
