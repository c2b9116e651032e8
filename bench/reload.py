"""Issue 15's figures: requests failed during 20 config reloads under steady load (goal 0), and
the p99 latency of requests that overlap a reload vs those that do not.

trioserve runs as its own process (``trioserve start``) with two echo models, ``echo`` and
``steady``, both loaded before the run. Clients (``--clients``, half of them streaming) send
small chat requests back to back, alternating between the two models, over keep-alive
connections, for the whole run. Meanwhile the config file is rewritten and ``POST
/admin/reload`` sent ``--reloads`` times, ``--interval`` s apart, alternating two kinds of
change: the limits of ``echo`` (``max_concurrency`` 64 ↔ 32, ``max_queue``, ``ttl``: applied
to the running process) and a model ``spare`` added or removed (no client uses it). Both
limits stay above the number of clients, so no request waits for a slot whichever config is in
force.
``--restarts`` adds a third kind: ``steady``'s ``env`` changed, so its process is replaced (the
old one finishes its requests, the next request waits for the new one to start).

A request overlaps a reload when its time on the wire (client side, send to last byte)
intersects the reload's (send of the POST to its answer). A request failed when its status was
not 200, it raised, or a stream ended without ``[DONE]``. Also checked: every reload answered
200 and the two models' processes are the same at the end as at the start (no reload restarted
them; with ``--restarts``, only ``steady``'s changed).

    .venv/bin/python bench/reload.py [--clients 8] [--reloads 20] [--interval 0.5]
        [--restarts] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio
from _daemon import daemon_process

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.admin import AdminAuth
from tests.support.config import echo_cmd, write_config
from tests.support.ports import free_port, port_range

CHAT = "/v1/chat/completions"
# 8 tokens, 5 ms apart: a request lasts ~40 ms upstream, so several are in flight at any moment.
ECHO_OPTIONS = ("--token-delay", "0.005")
# Load before the first reload and after the last one, in seconds. Latencies of requests that
# began in the first half of the warm-up are left out of both figures: each client opens its
# connection then, and those first requests are the slowest of the run, reload or not.
WARM_UP = 1.0
COOL_DOWN = 1.0


@dataclass(frozen=True)
class Sample:
    start: float
    end: float
    stream: bool
    ok: bool
    detail: str = ""


@dataclass
class Run:
    began: float = field(default_factory=time.perf_counter)
    samples: list[Sample] = field(default_factory=list)
    reloads: list[tuple[float, float, int, str]] = field(default_factory=list)  # start, end, ...


class ConfigFile:
    def __init__(self, path: Path, state_dir: Path) -> None:
        self.path = path
        self.state_dir = state_dir
        self.port = free_port()
        self.ports = port_range(16)
        self.url = f"http://127.0.0.1:{self.port}"

    def write(self, *, tight: bool, spare: bool, generation: int = 0) -> None:
        limits = {"max_concurrency": 32, "max_queue": 64, "ttl": 600}
        if not tight:
            limits = {"max_concurrency": 64, "max_queue": 128, "ttl": 300}
        models: dict[str, Any] = {
            "echo": {"cmd": echo_cmd(*ECHO_OPTIONS), **limits},
            # A changed env replaces the process: the old one finishes its requests first.
            "steady": {"cmd": echo_cmd(*ECHO_OPTIONS), "env": {"GENERATION": str(generation)}},
        }
        if spare:
            models["spare"] = {"cmd": echo_cmd()}
        write_config(
            self.path,
            self.state_dir,
            self.port,
            models,
            supervisor={"port_range": self.ports, "max_loaded": 3, "stop_grace": 5},
        )


async def one_request(client: httpx.AsyncClient, model: str, stream: bool) -> tuple[bool, str]:
    body = {"model": model, "stream": stream, "messages": [{"role": "user", "content": "a b c"}]}
    if not stream:
        response = await client.post(CHAT, json=body)
        if response.status_code != 200:
            return False, f"{response.status_code} {response.text[:120]}"
        return bool(response.json().get("choices")), "no choices"
    async with client.stream("POST", CHAT, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return False, f"{response.status_code} {response.text[:120]}"
        last = ""
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                last = line
        return last == "data: [DONE]", f"stream ended with {last[:120]!r}"


async def client_loop(url: str, stream: bool, run: Run, stop: trio.Event) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30, trust_env=False) as client:
        for turn in range(1_000_000):
            if stop.is_set():
                return
            model = "echo" if turn % 2 == 0 else "steady"
            start = time.perf_counter()
            try:
                ok, detail = await one_request(client, model, stream)
            except httpx.HTTPError as exc:
                ok, detail = False, f"{type(exc).__name__}: {exc}"
            run.samples.append(Sample(start, time.perf_counter(), stream, ok, "" if ok else detail))


async def reloader(
    url: str,
    file: ConfigFile,
    count: int,
    interval: float,
    restarts: bool,
    run: Run,
    stop: trio.Event,
) -> None:
    tight = spare = False
    generation = 0
    kinds = ["limits", "model", "restart"] if restarts else ["limits", "model"]
    admin = AdminAuth(file.state_dir)
    async with httpx.AsyncClient(base_url=url, timeout=60, trust_env=False, auth=admin) as client:
        await trio.sleep(WARM_UP)
        for index in range(count):
            kind = kinds[index % len(kinds)]
            if kind == "limits":
                tight = not tight
            elif kind == "model":
                spare = not spare
                kind = "model added" if spare else "model removed"
            else:
                generation += 1
            file.write(tight=tight, spare=spare, generation=generation)
            start = time.perf_counter()
            response = await client.post("/admin/reload")
            end = time.perf_counter()
            summary = response.json().get("summary", response.text[:120])
            run.reloads.append((start, end, response.status_code, f"{kind}: {summary}"))
            await trio.sleep(interval)
        await trio.sleep(COOL_DOWN)
    stop.set()


def model_pids(url: str) -> dict[str, int | None]:
    status = httpx.get(f"{url}/admin/status", timeout=10, trust_env=False).json()
    return {name: status["models"][name]["pid"] for name in ("echo", "steady")}


def p(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(run: Run, pids: tuple[dict[str, int | None], dict[str, int | None]]) -> dict[str, Any]:
    windows = [(start, end) for start, end, _, _ in run.reloads]

    def overlaps(sample: Sample) -> bool:
        return any(sample.start <= end and start <= sample.end for start, end in windows)

    def overlapping(kind: str) -> list[float]:
        """Latencies (ms) of the requests that overlap a reload of ``kind``."""
        spans = [(start, end) for start, end, _, what in run.reloads if what.startswith(kind)]
        return [
            (s.end - s.start) * 1000
            for s in ok
            if any(s.start <= end and start <= s.end for start, end in spans)
        ]

    settled = run.began + WARM_UP / 2
    ok = [s for s in run.samples if s.ok and s.start >= settled]
    during = [(s.end - s.start) * 1000 for s in ok if overlaps(s)]
    by_limits, by_model = overlapping("limits"), overlapping("model")
    by_restart = overlapping("restart")
    outside = [(s.end - s.start) * 1000 for s in ok if not overlaps(s)]
    failed = [s for s in run.samples if not s.ok]
    reload_ms = [(end - start) * 1000 for start, end, _, _ in run.reloads]
    return {
        "requests": len(run.samples),
        "streamed": sum(s.stream for s in run.samples),
        "failed": len(failed),
        "failures": sorted({s.detail for s in failed})[:5],
        "reloads": len(run.reloads),
        "reloads_refused": sum(status != 200 for _, _, status, _ in run.reloads),
        "reload_ms_median": statistics.median(reload_ms) if reload_ms else None,
        "reload_ms_max": max(reload_ms, default=None),
        "overlapping": len(during),
        "overlapping_p50_ms": p(during, 0.50),
        "overlapping_p99_ms": p(during, 0.99),
        "overlapping_limits_p99_ms": p(by_limits, 0.99),
        "overlapping_limits_max_ms": max(by_limits, default=float("nan")),
        "overlapping_model_p99_ms": p(by_model, 0.99),
        "overlapping_model_max_ms": max(by_model, default=float("nan")),
        "overlapping_restart_p99_ms": p(by_restart, 0.99),
        "overlapping_restart_max_ms": max(by_restart, default=float("nan")),
        "other": len(outside),
        "other_p50_ms": p(outside, 0.50),
        "other_p99_ms": p(outside, 0.99),
        "other_max_ms": max(outside, default=float("nan")),
        "processes_kept": pids[0] == pids[1],
        "restarted": sorted(name for name in pids[0] if pids[0][name] != pids[1][name]),
        "reload_summaries": [summary for _, _, _, summary in run.reloads[:4]],
    }


async def load_and_reload(url: str, file: ConfigFile, args: argparse.Namespace) -> Run:
    run = Run()
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        for index in range(args.clients):
            nursery.start_soon(client_loop, url, index % 2 == 1, run, stop)
        nursery.start_soon(
            reloader, url, file, args.reloads, args.interval, args.restarts, run, stop
        )
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--reloads", type=int, default=20)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between reloads")
    parser.add_argument(
        "--restarts",
        action="store_true",
        help="every third reload changes steady's env instead: its process is replaced",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="trioserve-reload-") as tmp:
        file = ConfigFile(Path(tmp) / "trioserve.toml", Path(tmp) / "state")
        file.write(tight=False, spare=False)
        log_path = Path(tmp) / "daemon.log"
        with daemon_process(file.path, log_path, file.url) as daemon:
            for name in ("echo", "steady"):
                loaded = httpx.post(
                    f"{file.url}/admin/models/{name}/load",
                    timeout=60,
                    auth=AdminAuth(file.state_dir),
                )
                loaded.raise_for_status()
            before = model_pids(file.url)
            run = trio.run(load_and_reload, file.url, file, args)
            after = model_pids(file.url)
        figures = report(run, (before, after))
        if daemon.returncode != 0:
            print(log_path.read_text()[-2000:], file=sys.stderr)

    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores")
        print(
            f"{figures['reloads']} reloads ({figures['reloads_refused']} refused), "
            f"{args.interval:g} s apart: each answered in {figures['reload_ms_median']:.1f} ms "
            f"(median; max {figures['reload_ms_max']:.1f})"
        )
        print(
            f"{figures['requests']} requests by {args.clients} clients "
            f"({figures['streamed']} streamed): {figures['failed']} failed"
            + (f" {figures['failures']}" if figures["failed"] else "")
        )
        print(
            f"latency overlapping a reload: p99 {figures['overlapping_p99_ms']:.1f} ms "
            f"(p50 {figures['overlapping_p50_ms']:.1f}, n={figures['overlapping']}); "
            f"not overlapping: p99 {figures['other_p99_ms']:.1f} ms "
            f"(p50 {figures['other_p50_ms']:.1f}, n={figures['other']})"
        )
        print(
            f"  by kind of reload: limits p99 {figures['overlapping_limits_p99_ms']:.1f} ms "
            f"(max {figures['overlapping_limits_max_ms']:.1f}), model added/removed p99 "
            f"{figures['overlapping_model_p99_ms']:.1f} ms "
            f"(max {figures['overlapping_model_max_ms']:.1f}); not overlapping max "
            f"{figures['other_max_ms']:.1f} ms"
        )
        if args.restarts:
            print(
                f"  steady replaced: overlapping p99 {figures['overlapping_restart_p99_ms']:.1f} "
                f"ms (max {figures['overlapping_restart_max_ms']:.1f}); processes restarted: "
                f"{figures['restarted']}"
            )
        else:
            print(f"model processes kept through every reload: {figures['processes_kept']}")
    kept = figures["restarted"] == (["steady"] if args.restarts else [])
    good = figures["failed"] == 0 and figures["reloads_refused"] == 0 and kept
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
