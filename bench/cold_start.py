"""Cold start: 100 concurrent requests at a stopped model.

Run with ``.venv/bin/python bench/cold_start.py`` (``--help`` for the options). It starts the
real daemon (``trioserve start``, next to this interpreter) on a free loopback port with a
temporary config and state dir, one model whose backend is the built-in echo app, and for each
round fires ``--requests`` concurrent chat requests at the model while it is stopped, then
unloads it again. The daemon is its own process so that this client's 100 connections do not
share its event loop; it is stopped with SIGTERM at the end. It prints, per round:

* **spawns**: how many processes the model's ``cmd`` started, counted by the child itself (it
  appends a line to a file before serving), not by our own bookkeeping. The goal is 1.
* **ok**: requests answered 200; **all done**, **p50**, **p99**: request latencies, measured by the
  client from the moment all requests were fired.
* **ready→fwd**: from the moment the backend's ``/health`` *could* first answer 200 to the moment
  the first request was forwarded to it. This is the figure with the goal (< 50 ms): it includes
  the wait for our next health probe (``START_PROBE_INTERVAL``), the probe itself, waking every
  waiting request, admission, and the relay's upstream request.
* **200→fwd**: from the moment the backend *sent* its first 200 on ``/health`` to the first
  forwarded request: the same minus the wait for the probe.

Method: the model's ``cmd`` is this script in ``backend`` mode. It serves the echo backend's
ASGI app (``trioserve.backends.echo``, imported unchanged, with ``--startup-delay`` so ``/health``
answers 503 "loading" first, like llama-server) wrapped by a recorder. All three timestamps are
taken inside the child on its own ``time.monotonic()`` clock, so no clocks are compared across
processes:

* ``ready_at``: when the app first runs (Hypercorn's lifespan startup) plus the startup delay;
  the echo app starts its own delay at that same call, so this is when ``/health`` turns 200;
* ``first_200``: when the response start of the first 200 on ``/health`` passes the wrapper;
* ``first_forward``: when the first ``POST /v1/chat/completions`` reaches the wrapper.

The child appends them to a JSON-lines file as they happen. The exit status is 0 when every
cold start spawned exactly once and met the goal, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio

HERE = Path(__file__).resolve()
STARTUP_DELAY = 0.5  # s the backend "loads" before /health turns 200
GOAL_MS = 50.0


# -- backend mode: runs in the model's child process --------------------------------------------


class _Recorder:
    """ASGI middleware around the echo app that writes the moments the bench measures."""

    def __init__(self, app: Any, record: Path, startup_delay: float) -> None:
        self.app = app
        self.record = record
        self.startup_delay = startup_delay
        self.seen: set[str] = set()

    def _note(self, what: str, at: float) -> None:
        if what in self.seen:
            return
        self.seen.add(what)
        with self.record.open("a") as f:
            f.write(json.dumps({"pid": os.getpid(), "what": what, "at": at}) + "\n")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        now = time.monotonic()
        if "ready_at" not in self.seen:
            self._note("ready_at", now + self.startup_delay)
        if scope["type"] == "http" and scope["path"] == "/v1/chat/completions":
            self._note("first_forward", now)
        if scope["type"] == "http" and scope["path"] == "/health":

            async def watched_send(message: Any) -> None:
                if message["type"] == "http.response.start" and message["status"] == 200:
                    self._note("first_200", time.monotonic())
                await send(message)

            await self.app(scope, receive, watched_send)
            return
        await self.app(scope, receive, send)


def backend_main(argv: list[str]) -> None:
    from hypercorn.config import Config as HypercornConfig
    from hypercorn.trio import serve

    from trioserve.backends.echo import EchoOptions, build_app

    parser = argparse.ArgumentParser(prog="cold_start.py backend")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--spawns", type=Path, required=True)
    parser.add_argument("--startup-delay", type=float, default=STARTUP_DELAY)
    args = parser.parse_args(argv)
    with args.spawns.open("a") as f:
        f.write(f"{os.getpid()}\n")
    app = _Recorder(
        build_app(EchoOptions(port=args.port, startup_delay=args.startup_delay)),
        args.record,
        args.startup_delay,
    )
    config = HypercornConfig()
    config.bind = [f"127.0.0.1:{args.port}"]
    config.accesslog = None
    config.backlog = 4096

    async def run() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:

            async def first_signal() -> None:
                async for _ in signals:
                    return

            await serve(app, config, shutdown_trigger=first_signal)  # type: ignore[arg-type]

    trio.run(run)


# -- bench mode ---------------------------------------------------------------------------------


def _write_config(path: Path, state_dir: Path, work: Path, delay: float) -> int:
    """The daemon's config, on a free port (returned). The tests' helpers write it: imported
    here, not at the top, because the model's child runs this file too and their imports
    (trioserve.config) would add ~0.3 s to every cold start it measures."""
    sys.path.insert(0, str(HERE.parents[1]))
    from tests.support.config import write_toml
    from tests.support.ports import free_port

    port = free_port()
    cmd = [
        "{python}",
        str(HERE),
        "backend",
        "--port",
        "{port}",
        "--record",
        str(work / "record.jsonl"),
        "--spawns",
        str(work / "spawns.txt"),
        "--startup-delay",
        str(delay),
    ]
    write_toml(
        path,
        {
            "server": {"host": "127.0.0.1", "port": port, "state_dir": str(state_dir)},
            "supervisor": {"port_range": [24000, 24999], "stop_grace": 5},
            "models": {"echo": {"cmd": cmd, "ttl": 0, "max_concurrency": 8, "max_queue": 1024}},
        },
    )
    return port


def _records(work: Path) -> dict[int, dict[str, float]]:
    by_pid: dict[int, dict[str, float]] = {}
    path = work / "record.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            by_pid.setdefault(entry["pid"], {})[entry["what"]] = entry["at"]
    return by_pid


def _spawned(work: Path) -> list[int]:
    path = work / "spawns.txt"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


async def _wait_listening(client: httpx.AsyncClient, daemon: trio.Process, log: Path) -> None:
    with trio.fail_after(30):
        while True:  # polling is the honest tool for "has it started listening yet"
            if daemon.returncode is not None:
                raise SystemExit(f"the daemon exited with {daemon.returncode}:\n{log.read_text()}")
            try:
                if (await client.get("/health")).status_code == 200:
                    return
            except httpx.TransportError:
                await trio.sleep(0.05)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _round(url: str, requests: int) -> tuple[int, list[float], float]:
    latencies: list[float] = []
    ok = 0
    body = {"model": "echo", "messages": [{"role": "user", "content": "cold start"}]}
    # A fresh client per round: no connection left idle from the last round, which the server
    # may be closing (keep-alive timeout) just as it is reused.
    limits = httpx.Limits(max_connections=requests)
    async with httpx.AsyncClient(
        base_url=url, timeout=60, limits=limits, trust_env=False
    ) as client:
        start = trio.current_time()

        async def one() -> None:
            nonlocal ok
            response = await client.post("/v1/chat/completions", json=body)
            latencies.append(trio.current_time() - start)
            ok += response.status_code == 200

        async with trio.open_nursery() as nursery:
            for _ in range(requests):
                nursery.start_soon(one)
        return ok, latencies, trio.current_time() - start


async def bench(rounds: int, requests: int, startup_delay: float) -> int:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="trioserve-bench-") as tmp:
        work = Path(tmp)
        config = work / "trioserve.toml"
        port = _write_config(config, work / "state", work, startup_delay)
        from tests.support.admin import AdminAuth  # on the path now (_write_config)

        trioserve = Path(sys.executable).with_name("trioserve")
        with (work / "daemon.log").open("w") as log:
            daemon = await trio.lowlevel.open_process(
                [str(trioserve), "start", "--config", str(config), "--log-level", "warning"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            url = f"http://127.0.0.1:{port}"
            admin = AdminAuth(work / "state")
            async with httpx.AsyncClient(
                base_url=url, timeout=60, trust_env=False, auth=admin
            ) as client:
                await _wait_listening(client, daemon, work / "daemon.log")
                for number in range(1, rounds + 1):
                    before = len(_spawned(work))
                    ok, latencies, took = await _round(url, requests)
                    pids = _spawned(work)[before:]
                    marks = _records(work).get(pids[0], {}) if pids else {}
                    rows.append(
                        {
                            "round": number,
                            "spawns": len(pids),
                            "ok": ok,
                            "took": took,
                            "p50": _percentile(latencies, 0.5),
                            "p99": _percentile(latencies, 0.99),
                            "ready_fwd": 1000 * (marks["first_forward"] - marks["ready_at"]),
                            "ok_fwd": 1000 * (marks["first_forward"] - marks["first_200"]),
                        }
                    )
                    response = await client.post("/admin/models/echo/unload")
                    response.raise_for_status()
        except BaseException:
            print("daemon log:\n" + (work / "daemon.log").read_text()[-4000:], file=sys.stderr)
            raise
        finally:
            if daemon.returncode is None:
                daemon.send_signal(signal.SIGTERM)
                with trio.move_on_after(15):
                    await daemon.wait()
                if daemon.returncode is None:
                    daemon.kill()
                    await daemon.wait()

    print(
        f"cold start: {requests} concurrent chat requests at a stopped model "
        f"(echo backend, /health 503 for {startup_delay:g}s), {rounds} rounds"
    )
    header = (
        f"{'round':>5}  {'spawns':>6}  {'ok':>7}  {'all done':>9}  {'p50':>7}  {'p99':>7}  "
        f"{'ready→fwd':>10}  {'200→fwd':>8}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['round']:>5}  {row['spawns']:>6}  {row['ok']:>3}/{requests:<3}  "
            f"{row['took']:>8.3f}s  {row['p50']:>6.3f}s  {row['p99']:>6.3f}s  "
            f"{row['ready_fwd']:>8.1f}ms  {row['ok_fwd']:>6.1f}ms"
        )
    gaps = [row["ready_fwd"] for row in rows]
    spawns = [row["spawns"] for row in rows]
    print("-" * len(header))
    worst = max(gaps)
    verdict = "met" if worst < GOAL_MS else "MISSED"
    print(
        f"spawns per cold start: {sorted(set(spawns))} (goal: exactly 1)\n"
        f"ready→first forward: median {statistics.median(gaps):.1f} ms, "
        f"max {worst:.1f} ms (goal < {GOAL_MS:g} ms: {verdict})"
    )
    return 0 if set(spawns) == {1} and worst < GOAL_MS else 1


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "backend":
        backend_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--startup-delay", type=float, default=STARTUP_DELAY)
    args = parser.parse_args()
    sys.exit(trio.run(bench, args.rounds, args.requests, args.startup_delay))


if __name__ == "__main__":
    main()
