"""Issue 18's figures: llama-server's slot after a non-streaming client hangs up or gets a 504,
directly and through trioserve; and what sending non-streaming requests upstream as streams
costs (tokens/s and added latency, ``stream_upstream`` true vs false).

Needs ``make real-model``. trioserve runs as its own process (``trioserve start``) with two
models, the same llama-server command (Gemma 3 270M, one slot, one thread) under two names:
``gemma-3-270m`` with ``stream_upstream = true`` (the default) and ``gemma-3-270m-plain`` with
``false`` (how trioserve relayed them before). "direct" requests go to the very llama-server
trioserve runs for ``gemma-3-270m`` (its port from ``/admin/status``).

Slot busy = from the hang-up (or the client's receipt of the 504) until llama-server logs that
the run's task stopped processing (``release: ... task N | stop processing``), read through
trioserve's ``/admin/models/NAME/logs`` every 10 ms. Not by polling llama-server: any request to
it (``/slots`` included) wakes the threads that wait for a non-streaming answer and postpones
their once-a-second check of the client connection, so polling would keep a non-streaming
request from ever being cancelled and flatter trioserve. Where the upstream request is a stream
that check is not involved, and ``/slots`` (polled every 20 ms) is reported beside the log's
figure as a cross-check (``--polled`` shows what polling does to a direct non-streaming
request). The k-th of N runs hangs up after ``--hang-up-after`` + k/N s, so the
hang-ups fall at every phase of llama-server's once-a-second check; 504s come from a second
daemon per run whose ``first_byte_timeout`` is ``--deadline`` + k/N s.

Throughput: the same non-streaming requests (``ignore_eos``, ``cache_prompt: false``, so every
request does the same work), interleaved, the order alternating, to four targets: each model
through trioserve and each model's llama-server directly. Per request: tokens/s as the client
sees it (completion tokens / latency) and added latency (client latency less llama-server's own
prompt + generation time, from the answer's ``timings``). Two llama-server processes serve the
two models, so the comparison is also made relative to each one's direct figures.

``--api responses`` or ``--api messages`` measures the slot the same way for OpenAI's Responses
API (``/v1/responses``) or Anthropic's Messages API (``/v1/messages``), whose non-streaming
requests trioserve also sends upstream as streams and assembles. Their cases add a streaming
request hung up through trioserve, and a streaming request's "504": ``request_timeout``
(``--deadline`` + k/N + ``STREAM_DEADLINE_AFTER`` s; ``first_byte_timeout`` does not apply once
the stream's first byte came) cutting its answer with a last error event, the slot timed from
the client's receipt of that event. The throughput part is chat's only (assembled Responses
and Messages answers carry no ``timings``): with another API it is skipped.

    .venv/bin/python bench/cancel.py [--runs 6] [--max-tokens 300] [--rounds 4] [--json]
    .venv/bin/python bench/cancel.py --api responses|messages [--runs 6] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import trio
from _daemon import wait_healthy

# Where llama-server and the GGUF are, and how trioserve runs them, is shared with the tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.admin import AdminAuth
from tests.support.config import daemon_config
from tests.support.real_model import MODEL, llama_model, missing

PLAIN = MODEL + "-plain"
MODELS = {
    MODEL: llama_model(parallel=1),
    PLAIN: {**llama_model(parallel=1), "stream_upstream": False},
}
CHAT = "/v1/chat/completions"
# The paths of the APIs --api picks from.
API_PATHS = {"chat": CHAT, "responses": "/v1/responses", "messages": "/v1/messages"}
# A streaming request's request_timeout, after the run's first_byte_timeout (which a
# non-streaming request meets first).
STREAM_DEADLINE_AFTER = 0.5
LONG_PROMPT = "Count from 1 to 1000, separated by commas."
PROMPTS = [
    "Count from 1 to 200, separated by commas.",
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works, step by step.",
    "List twenty fruits and one fact about each.",
    "Describe the water cycle to a ten-year-old.",
]
LOG_POLL = 0.01
SLOTS_POLL = 0.02
# How long one run may wait for the slot: a generation that is not cancelled runs to its end.
RELEASE_LIMIT = 180.0

_LAUNCHED = re.compile(r"task (\d+) \| processing task")


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- trioserve and its llama-servers ----------------------------------------------------------


@dataclass
class Daemon:
    base: str
    client: httpx.AsyncClient
    ports: dict[str, int]
    process: psutil.Process

    def cpu_seconds(self) -> float:
        times = self.process.cpu_times()
        return float(times.user + times.system)

    async def log_lines(self, model: str, tail: int = 200) -> list[str]:
        response = await self.client.get(f"/admin/models/{model}/logs", params={"tail": tail})
        response.raise_for_status()
        return response.text.splitlines()

    async def last_task(self, model: str) -> int:
        """The id of the task llama-server launched last (-1: none yet)."""
        found = [int(m[1]) for line in await self.log_lines(model) if (m := _LAUNCHED.search(line))]
        return max(found, default=-1)


@asynccontextmanager
async def running_daemon(tmp: Path, name: str, **server: Any) -> AsyncIterator[Daemon]:
    """``trioserve start`` with MODELS, both loaded; stopped with SIGTERM on exit."""
    state_dir = tmp / f"state-{name}"
    config, base = daemon_config(
        tmp / f"{name}.toml",
        state_dir,
        MODELS,
        server=server or None,
        supervisor={"start_timeout": 60, "stop_grace": 5},
    )
    trioserve = Path(sys.executable).with_name("trioserve")
    log_path = tmp / f"{name}.log"
    with log_path.open("wb") as log:
        daemon = subprocess.Popen(
            [str(trioserve), "start", "--config", str(config), "--log-level", "warning"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        await trio.to_thread.run_sync(wait_healthy, base, daemon)
        # A new connection per request, on every path (as bench/real_model.py does it).
        limits = httpx.Limits(max_connections=8, max_keepalive_connections=0)
        async with httpx.AsyncClient(
            base_url=base,
            trust_env=False,
            timeout=RELEASE_LIMIT,
            limits=limits,
            auth=AdminAuth(state_dir),  # the loads and the logs
        ) as client:
            ports = {}
            for model in MODELS:
                response = await client.post(f"/admin/models/{model}/load")
                response.raise_for_status()
                ports[model] = int(response.json()["port"])
            yield Daemon(base, client, ports, psutil.Process(daemon.pid))
    except BaseException:
        tail = log_path.read_text(errors="replace").splitlines()[-30:]
        print("trioserve's log:\n" + "\n".join(tail), file=sys.stderr)
        raise
    finally:
        daemon.send_signal(signal.SIGTERM)
        await trio.to_thread.run_sync(daemon.wait, 30)


# -- slot busy after a hang-up or a 504 -------------------------------------------------------


@dataclass
class Busy:
    """One run: seconds until llama-server's log said the task stopped (and until /slots
    showed no slot processing, where measured); whether it was cancelled or ran to its end."""

    log_s: float
    slots_s: float | None
    cancelled: bool


async def slot_freed(
    daemon: Daemon, model: str, task: int, since: float, *, poll_slots: bool
) -> Busy:
    """Wait until ``task`` stopped processing; seconds from ``since``."""
    released = re.compile(rf"task {task} \| stop processing")
    cancelled = f"cancel task, id_task = {task}"
    log_s: float | None = None
    slots_s: float | None = None
    was_cancelled = False

    async def watch_log() -> None:
        nonlocal log_s, was_cancelled
        while True:
            lines = await daemon.log_lines(model, tail=60)
            if any(released.search(line) for line in lines):
                log_s = trio.current_time() - since
                was_cancelled = any(cancelled in line for line in lines)
                return
            await trio.sleep(LOG_POLL)

    async def watch_slots() -> None:
        nonlocal slots_s
        url = f"http://127.0.0.1:{daemon.ports[model]}/slots"
        while True:
            slots = (await daemon.client.get(url)).json()
            if not any(slot["is_processing"] for slot in slots):
                slots_s = trio.current_time() - since
                return
            await trio.sleep(SLOTS_POLL)

    with trio.fail_after(RELEASE_LIMIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_log)
            if poll_slots:
                nursery.start_soon(watch_slots)
    assert log_s is not None
    return Busy(log_s, slots_s, was_cancelled)


def raw_post(port: int, body: dict[str, Any], path: str = CHAT) -> bytes:
    data = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode() + data


def long_request(model: str, max_tokens: int, *, stream: bool, api: str = "chat") -> dict[str, Any]:
    # llama-server: exactly max_tokens tokens unless cancelled (its Messages API drops
    # ignore_eos; this prompt runs to max_tokens all the same).
    if api == "responses":
        return {
            "model": model,
            "input": LONG_PROMPT,
            "max_output_tokens": max_tokens,
            "ignore_eos": True,
            "stream": stream,
        }
    return {
        "model": model,
        "messages": [{"role": "user", "content": LONG_PROMPT}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
    }


async def hang_up(
    daemon: Daemon,
    model: str,
    port: int,
    body: dict[str, Any],
    after: float,
    *,
    streamed: bool,
    path: str = CHAT,
) -> Busy:
    """Send ``body`` to ``port`` (trioserve's or llama-server's), hang up ``after`` s later."""
    before = await daemon.last_task(model)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        await stream.send_all(raw_post(port, body, path))
        await trio.sleep(after)
        task = await daemon.last_task(model)
    finally:
        await stream.aclose()
    since = trio.current_time()
    if task == before:
        raise RuntimeError(f"llama-server started no task within {after:.2f}s")
    return await slot_freed(daemon, model, task, since, poll_slots=streamed)


async def timeout_504(
    daemon: Daemon, model: str, body: dict[str, Any], *, streamed: bool, path: str = CHAT
) -> Busy:
    """Send ``body`` through trioserve, whose first_byte_timeout answers it with a 504 (a
    streaming ``body``: whose request_timeout cuts the stream with an error event)."""
    before = await daemon.last_task(model)
    if body.get("stream"):
        since = await stream_cut(daemon, path, body)
    else:
        response = await daemon.client.post(path, json=body)
        since = trio.current_time()
        if response.status_code != 504:
            raise RuntimeError(f"expected a 504, got {response.status_code}: {response.text[:300]}")
    task = await daemon.last_task(model)
    if task == before:
        raise RuntimeError("llama-server started no task before the 504")
    return await slot_freed(daemon, model, task, since, poll_slots=streamed)


async def stream_cut(daemon: Daemon, path: str, body: dict[str, Any]) -> float:
    """Send the streaming ``body`` through trioserve; when its deadline's error event came."""
    async with daemon.client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"{path} answered {response.status_code}: {response.text[:300]}")
        async for line in response.aiter_lines():
            # OpenAI's dialect: data: {"error": ...}; Anthropic's: event: error, then its data.
            if line.startswith('data: {"error"') or line == "event: error":
                return trio.current_time()
    raise RuntimeError(f"{path}: the stream ended without the deadline's error event")


def busy_summary(runs: list[Busy]) -> dict[str, Any]:
    log = [run.log_s for run in runs]
    slots = [run.slots_s for run in runs if run.slots_s is not None]
    return {
        "median_s": statistics.median(log),
        "max_s": max(log),
        "runs_s": log,
        "cancelled": sum(run.cancelled for run in runs),
        "slots_median_s": statistics.median(slots) if slots else None,
        "slots_max_s": max(slots) if slots else None,
    }


async def measure_busy(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    runs, api = args.runs, args.api
    path = API_PATHS[api]
    afters = [args.hang_up_after + k / runs for k in range(runs)]
    results: dict[str, list[Busy]] = {}
    async with running_daemon(tmp, "hang-up") as daemon:
        port = int(daemon.base.rsplit(":", 1)[1])
        direct = daemon.ports[MODEL]
        cases = [
            ("direct, streaming", MODEL, direct, True, True),
            ("direct, non-streaming", MODEL, direct, False, False),
            ("trioserve, stream_upstream = false", PLAIN, port, False, False),
            ("trioserve, stream_upstream = true", MODEL, port, False, True),
        ]
        if api != "chat":
            cases.insert(2, ("trioserve, streaming", MODEL, port, True, True))
        if args.polled:
            # What the issue saw: /slots polled while a non-streaming request waits.
            cases.append(("direct, non-streaming, /slots polled", MODEL, direct, False, True))
        progress(f"hang-up: {runs} runs of {len(cases)} cases, interleaved")
        for after in afters:
            for label, model, target, stream, streamed in cases:
                body = long_request(model, args.max_tokens, stream=stream, api=api)
                busy = await hang_up(
                    daemon, model, target, body, after, streamed=streamed, path=path
                )
                results.setdefault(f"hang-up: {label}", []).append(busy)
    # first_byte_timeout is the daemon's: one daemon per run, so that the 504s, like the
    # hang-ups, fall at every phase of llama-server's once-a-second check.
    deadline_cases = [
        ("trioserve, stream_upstream = false", PLAIN, False, False),
        ("trioserve, stream_upstream = true", MODEL, False, True),
    ]
    if api != "chat":
        deadline_cases.append(("trioserve, streaming (request_timeout)", MODEL, True, True))
    progress(f"504: {runs} runs (a daemon each) of {len(deadline_cases)} cases")
    for k in range(runs):
        deadline = args.deadline + k / runs
        server: dict[str, Any] = {"first_byte_timeout": deadline}
        if api != "chat":
            server["request_timeout"] = deadline + STREAM_DEADLINE_AFTER
        async with running_daemon(tmp, f"deadline-{k}", **server) as daemon:
            for label, model, stream, streamed in deadline_cases:
                body = long_request(model, args.max_tokens, stream=stream, api=api)
                busy = await timeout_504(daemon, model, body, streamed=streamed, path=path)
                results.setdefault(f"504: {label}", []).append(busy)
    return {name: busy_summary(each) for name, each in results.items()}


# -- tokens/s and added latency of non-streaming requests -------------------------------------


@dataclass
class Sample:
    latency: float
    tokens: int
    tok_s: float
    server_tok_s: float
    added: float  # latency less llama-server's own prompt + generation time
    daemon_cpu: float  # trioserve's CPU time meanwhile (requests are one at a time)


async def non_streaming(
    daemon: Daemon, url: str, model: str, prompt: str, max_tokens: int
) -> Sample:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "seed": 1,
        "ignore_eos": True,
        "cache_prompt": False,
    }
    cpu = daemon.cpu_seconds()
    start = time.perf_counter()
    response = await daemon.client.post(url, json=body)
    latency = time.perf_counter() - start
    cpu = daemon.cpu_seconds() - cpu
    if response.status_code != 200:
        raise RuntimeError(f"{url} answered {response.status_code}: {response.text[:300]}")
    answer = response.json()
    tokens = int(answer["usage"]["completion_tokens"])
    timings = answer["timings"]
    own = (float(timings["prompt_ms"]) + float(timings["predicted_ms"])) / 1000
    return Sample(
        latency,
        tokens,
        tokens / latency,
        float(timings["predicted_per_second"]),
        latency - own,
        cpu,
    )


def sample_summary(samples: list[Sample]) -> dict[str, float]:
    return {
        "n": len(samples),
        "tok_s_p50": statistics.median(s.tok_s for s in samples),
        "latency_p50_ms": 1000 * statistics.median(s.latency for s in samples),
        "added_p50_ms": 1000 * statistics.median(s.added for s in samples),
        "server_tok_s_p50": statistics.median(s.server_tok_s for s in samples),
        # Share of the client's latency that was llama-server's own work: tokens/s with the
        # backend's speed (which drifts with the machine's load) taken out.
        "kept_p50": statistics.median(1 - s.added / s.latency for s in samples),
        # Mean, not median: CPU times tick in 10 ms.
        "daemon_cpu_mean_ms": 1000 * statistics.fmean(s.daemon_cpu for s in samples),
    }


async def measure_throughput(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    samples: dict[str, list[Sample]] = {}
    async with running_daemon(tmp, "throughput") as daemon:
        targets = {
            "direct A": (f"http://127.0.0.1:{daemon.ports[MODEL]}{CHAT}", MODEL),
            "trioserve stream_upstream=true (A)": (daemon.base + CHAT, MODEL),
            "direct B": (f"http://127.0.0.1:{daemon.ports[PLAIN]}{CHAT}", PLAIN),
            "trioserve stream_upstream=false (B)": (daemon.base + CHAT, PLAIN),
        }
        samples = {name: [] for name in targets}
        names = list(targets)
        progress(
            f"throughput: {len(PROMPTS)} prompts x {args.rounds} rounds (+1 warm-up) x "
            f"{len(names)} targets, non-streaming, {args.tokens} tokens each"
        )
        for round_no in range(1 + args.rounds):
            for i, prompt in enumerate(PROMPTS):
                order = names if (round_no + i) % 2 == 0 else names[::-1]
                for name in order:
                    url, model = targets[name]
                    sample = await non_streaming(daemon, url, model, prompt, args.tokens)
                    if round_no > 0:
                        samples[name].append(sample)
    return {name: sample_summary(each) for name, each in samples.items()}


# -- the whole run ----------------------------------------------------------------------------


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    if missing():
        sys.exit(f"{', '.join(missing())} missing: run `make real-model` first")
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "load_before": os.getloadavg()},
        "params": {
            key: getattr(args, key)
            for key in ("runs", "max_tokens", "hang_up_after", "deadline", "rounds", "tokens")
        },
    }
    if args.api != "chat":
        result["params"]["api"] = args.api
    with tempfile.TemporaryDirectory(prefix="trioserve-bench-cancel-") as tmpdir:
        tmp = Path(tmpdir)
        if not args.skip_busy:
            result["busy"] = await measure_busy(tmp, args)
        if not args.skip_throughput and args.api == "chat":
            result["throughput"] = await measure_throughput(tmp, args)
    result["machine"]["load_after"] = os.getloadavg()
    return result


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.0f} ms"


def print_rows(
    rows: list[tuple[str, ...]], left: frozenset[int] | set[int] = frozenset({0})
) -> None:
    """Columns padded to their widest cell; ``left`` ones left-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(
                cell.ljust(w) if i in left else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )


def print_table(r: dict[str, Any]) -> None:
    p = r["params"]
    if "busy" in r:
        if "api" in p:
            print(f"{API_PATHS[p['api']]}: ", end="")
        eos = (
            "ignore_eos, which llama-server's Messages API drops"
            if p.get("api") == "messages"
            else "ignore_eos"
        )
        print(
            f"Slot busy after the client left ({p['runs']} runs each; {p['max_tokens']} tokens "
            f"asked, {eos}; hang-up after {p['hang_up_after']:g}-"
            f"{p['hang_up_after'] + (p['runs'] - 1) / p['runs']:.2f} s; 504 from "
            f"first_byte_timeout = {p['deadline']:g}-"
            f"{p['deadline'] + (p['runs'] - 1) / p['runs']:.2f} s"
            + (
                f", a stream's from request_timeout {STREAM_DEADLINE_AFTER:g} s later"
                if "api" in p
                else ""
            )
            + ")"
        )
        rows: list[tuple[str, ...]] = [
            ("", "median", "max", "cancelled", "/slots median", "/slots max", "runs")
        ]
        for name, s in r["busy"].items():
            rows.append(
                (
                    name,
                    ms(s["median_s"]),
                    ms(s["max_s"]),
                    f"{s['cancelled']}/{len(s['runs_s'])}",
                    ms(s["slots_median_s"]),
                    ms(s["slots_max_s"]),
                    ", ".join(f"{1000 * v:.0f}" for v in s["runs_s"]),
                )
            )
        print_rows(rows, left={0, 6})
        print()
    if "throughput" in r:
        t = r["throughput"]
        print(
            f"Non-streaming requests, {p['tokens']} tokens each (ignore_eos, cache_prompt "
            f"false), {len(PROMPTS)} prompts x {p['rounds']} rounds per target, interleaved"
        )
        rows = [
            (
                "",
                "tokens/s p50",
                "latency p50",
                "added p50",
                "llama-server's own tok/s",
                "its share of latency",
                "trioserve CPU mean",
            )
        ]
        for name, s in t.items():
            rows.append(
                (
                    name,
                    f"{s['tok_s_p50']:.2f}",
                    f"{s['latency_p50_ms']:.0f} ms",
                    f"{s['added_p50_ms']:.1f} ms",
                    f"{s['server_tok_s_p50']:.2f}",
                    f"{s['kept_p50']:.5f}",
                    f"{s['daemon_cpu_mean_ms']:.1f} ms",
                )
            )
        print_rows(rows)
        da, ta = t["direct A"], t["trioserve stream_upstream=true (A)"]
        db, tb = t["direct B"], t["trioserve stream_upstream=false (B)"]
        print(
            f"stream_upstream true vs false, tokens/s: {ta['tok_s_p50'] / tb['tok_s_p50']:.4f}x; "
            "each relative to its own llama-server direct: "
            f"{ta['tok_s_p50'] / da['tok_s_p50']:.4f} vs {tb['tok_s_p50'] / db['tok_s_p50']:.4f} "
            f"({(ta['tok_s_p50'] / da['tok_s_p50']) / (tb['tok_s_p50'] / db['tok_s_p50']):.4f}x)"
        )
        print(
            "share of latency that was llama-server's own work, true vs false: "
            f"{ta['kept_p50'] / tb['kept_p50']:.5f}x (the tokens/s ratio without the backend's "
            "speed)"
        )
        print(
            "added latency over direct: stream_upstream true "
            f"{ta['added_p50_ms'] - da['added_p50_ms']:+.1f} ms, false "
            f"{tb['added_p50_ms'] - db['added_p50_ms']:+.1f} ms"
        )
    m = r["machine"]
    print(
        f"Load average (1 min) {m['load_before'][0]:.2f} before, {m['load_after'][0]:.2f} after, "
        f"on {m['cpus']} CPUs."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--runs", type=int, default=6, help="runs per hang-up/504 case")
    parser.add_argument(
        "--max-tokens", type=int, default=300, help="tokens the cancelled requests ask for"
    )
    parser.add_argument("--hang-up-after", type=float, default=1.0, help="s, first run's")
    parser.add_argument(
        "--deadline", type=float, default=1.0, help="s, first run's first_byte_timeout"
    )
    parser.add_argument("--rounds", type=int, default=4, help="throughput rounds over prompts")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per throughput request")
    parser.add_argument(
        "--polled",
        action="store_true",
        help="also a direct non-streaming hang-up with /slots polled every 20 ms meanwhile",
    )
    parser.add_argument(
        "--api",
        choices=list(API_PATHS),
        default="chat",
        help="the API whose requests are cancelled (responses, messages: no throughput part)",
    )
    parser.add_argument("--skip-busy", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    args = parser.parse_args()
    result = trio.run(main_async, args)
    if args.json:
        print(json.dumps(result, indent=2, default=lambda o: asdict(o)))
    else:
        print_table(result)


if __name__ == "__main__":
    main()
