"""A real LLM through trioserve vs. the same llama-server directly: tokens/s, TTFT, cold start.

Needs ``make real-model``. Runs trioserve (``trioserve start``) as its own process, serving
Gemma 3 270M through llama-server, and sends the same streaming chat requests, interleaved, to
that very llama-server directly (its port read from ``/admin/status``) and through trioserve,
so the backend, its caches and the machine's state are the same for both and the ratio is about
trioserve alone. Warm-up requests are discarded; figures are p50 (and p90) over the rest.

* tokens/s: generation rate seen by the client, (tokens - 1) / (last token - first token)
* TTFT: request sent → first content token received
* normalised by llama-server's own ``timings`` of the same request, which take the backend's
  speed (and whatever else the machine is doing) out of the comparison: the share of its own
  generation rate that reached the client, and TTFT less its prompt processing time
* cold start: llama-server spawned by hand → its /health answers 200, vs. trioserve's
  ``POST /admin/models/NAME/load`` on a stopped model (spawn, health probes, ready)

``--api`` picks the API of the streaming requests: ``chat`` (``/v1/chat/completions``, the
default), ``responses`` (OpenAI's ``/v1/responses``: a token is a ``response.output_text.delta``
event, the timings come with ``response.completed``) or ``messages`` (Anthropic's
``/v1/messages``: a token is a ``content_block_delta`` event). Several APIs (``--api chat
responses messages``) are interleaved in one run, each through trioserve and directly.
llama-server's Messages stream carries no ``timings`` (and its Messages API ignores
``timings_per_token``, ``seed`` and ``ignore_eos``: its requests run to max_tokens or the end of
the answer, the same for both paths at temperature 0), so for Messages they are read from
llama-server's own log, through trioserve's ``/admin/models/NAME/logs``: its ``print_timing``
lines give each task's prompt time and tokens (``prompt eval time = … ms / N tokens``) and its
generation time and tokens (``eval time = …``), the very figures of a stream's ``timings``
(llama-server prints them from the same counters; ``prompt_ms`` 76.539 in a chat stream's
timings was ``76.54 ms`` in its log). A task is matched to its request by its prompt tokens
(``message_start``'s ``input_tokens``) and generated tokens (``message_delta``'s
``output_tokens``); a request no task matches alone is counted as failed, never guessed. The
log is read after every request of every path when Messages is measured, so that each path
bears the same reads, and where a stream has its own timings the log's are compared with them
(``log vs stream timings``).

    .venv/bin/python bench/real_model.py [--rounds 4] [--max-tokens 64] [--json]
    .venv/bin/python bench/real_model.py --api responses|messages  # or several, interleaved
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import trio

# Where llama-server and the GGUF are, and how trioserve runs them, is shared with the tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.admin import AdminAuth
from tests.support.config import daemon_config
from tests.support.ports import free_port
from tests.support.real_model import MODEL, llama_cmd, llama_model, missing

PROMPTS = [
    "Count from 1 to 200, separated by commas.",
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works, step by step.",
    "List twenty fruits and one fact about each.",
    "Describe the water cycle to a ten-year-old.",
]


THREADS = 1
API_PATHS = {
    "chat": "/v1/chat/completions",
    "responses": "/v1/responses",
    "messages": "/v1/messages",
}
# llama-server's log: a task's timings, printed as it ends (its stream's ``timings`` figures).
_TIMING = re.compile(r"task (\d+) \| +(prompt eval|eval) time = +([\d.]+) ms / +(\d+) tokens")
# How long llama-server's timing lines may take to reach trioserve's log after the answer.
LOG_WAIT = 10.0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class Sample:
    ttft: float
    tokens: int
    tok_s: float
    # llama-server's own view of the same request (the `timings` of its last chunk; for
    # Messages, of its log: ``LlamaLog``)
    server_tok_s: float
    server_prompt_s: float
    # What llama-server counted, to find its task in the log: prompt tokens it processed,
    # tokens it generated (0: not known).
    prompt_n: int = 0
    predicted_n: int = 0
    # The difference of the log's prompt time from the stream's, where both were read (ms).
    log_vs_stream_ms: float | None = field(default=None)

    @property
    def kept(self) -> float:
        """The share of llama-server's own generation rate that reached the client."""
        return self.tok_s / self.server_tok_s

    @property
    def ttft_beyond_prompt(self) -> float:
        """TTFT less llama-server's prompt processing: queueing, transport, relaying."""
        return self.ttft - self.server_prompt_s


def request_body(api: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """A streaming request of ``api`` for ``prompt``: greedy, and (but for Messages, which
    drops it) ``ignore_eos``: always max_tokens tokens, so both paths do equal work."""
    if api == "responses":
        return {
            "model": MODEL,
            "input": prompt,
            "max_output_tokens": max_tokens,
            "stream": True,
            "temperature": 0,
            "seed": 1,
            "ignore_eos": True,
        }
    if api == "messages":
        return {
            "model": MODEL,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "stream": True,
            "temperature": 0,
        }
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
        "temperature": 0,
        "seed": 1,
        "ignore_eos": True,  # llama-server: always max_tokens tokens, so both paths do equal work
    }


async def stream_once(
    client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, api: str = "chat"
) -> Sample:
    try:
        return await _stream_once(client, url, request_body(api, prompt, max_tokens))
    except httpx.HTTPError as exc:
        raise RuntimeError(f"{url}: {exc!r}") from exc


def _token(data: dict[str, Any]) -> bool:
    """Whether the event ``data`` (of any of the three APIs) carries a generated token."""
    kind = data.get("type")
    if kind is None:  # chat
        choices = data.get("choices") or []
        return bool(choices and choices[0].get("delta", {}).get("content"))
    if kind == "response.output_text.delta":
        return bool(data.get("delta"))
    if kind == "content_block_delta":
        return bool(data["delta"].get("text"))
    return False


async def _stream_once(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Sample:
    start = time.perf_counter()
    first = last = 0.0
    tokens = prompt_n = predicted_n = 0
    server_tok_s: float | None = None
    server_prompt_s = 0.0
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"{url} answered {response.status_code}: {response.text[:500]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            data = json.loads(line[6:])
            if "error" in data:
                raise RuntimeError(f"stream error: {data['error']}")
            if _token(data):
                tokens += 1
                if tokens == 1:
                    first = now
                last = now
            elif data.get("type") == "message_start":
                prompt_n = int(data["message"]["usage"]["input_tokens"])
            elif data.get("type") == "message_delta":
                predicted_n = int(data["usage"]["output_tokens"])
            timings = data.get("timings")
            if timings:
                server_tok_s = float(timings["predicted_per_second"])
                server_prompt_s = float(timings["prompt_ms"]) / 1000
                prompt_n, predicted_n = int(timings["prompt_n"]), int(timings["predicted_n"])
    if tokens < 2 or (server_tok_s is None and not prompt_n):
        raise RuntimeError(f"only {tokens} tokens (or no timings) from {url}")
    return Sample(
        first - start,
        tokens,
        (tokens - 1) / (last - first),
        math.nan if server_tok_s is None else server_tok_s,
        math.nan if server_tok_s is None else server_prompt_s,
        prompt_n,
        predicted_n,
    )


@dataclass
class Timing:
    """One task's ``print_timing`` lines in llama-server's log."""

    prompt_ms: float = math.nan
    prompt_n: int = -1
    eval_ms: float = math.nan
    eval_n: int = -1


class LlamaLog:
    """llama-server's per-task timings, read from its log through trioserve (see above)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.seen = -1  # the last task taken

    async def _timings(self) -> dict[int, Timing]:
        response = await self.client.get(f"/admin/models/{MODEL}/logs", params={"tail": 400})
        response.raise_for_status()
        found: dict[int, Timing] = {}
        for match in _TIMING.finditer(response.text):
            timing = found.setdefault(int(match[1]), Timing())
            if match[2] == "prompt eval":
                timing.prompt_ms, timing.prompt_n = float(match[3]), int(match[4])
            else:
                timing.eval_ms, timing.eval_n = float(match[3]), int(match[4])
        return found

    async def skip(self) -> None:
        """From now on: tasks ended so far are not taken."""
        self.seen = max(await self._timings(), default=self.seen)

    async def take(self, count: int) -> list[Timing]:
        """The timings of the next ``count`` tasks to end (waits for their lines)."""
        with trio.fail_after(LOG_WAIT):
            while True:
                new = {
                    task: timing
                    for task, timing in (await self._timings()).items()
                    if task > self.seen and timing.eval_n >= 0
                }
                if len(new) >= count:
                    self.seen = max(new)
                    return list(new.values())
                await trio.sleep(0.02)

    async def fill(self, samples: list[Sample], count: int) -> list[str]:
        """Give each of ``samples`` its task's timings (``count`` requests were made; some may
        have failed); returns what could not be matched."""
        timings = await self.take(count)
        problems = []
        for sample in samples:
            matches = [
                t
                for t in timings
                if (t.prompt_n, t.eval_n) == (sample.prompt_n, sample.predicted_n)
            ]
            if len(matches) != 1:
                if math.isnan(sample.server_prompt_s):
                    problems.append(
                        f"{len(matches)} tasks in the log with {sample.prompt_n} prompt and "
                        f"{sample.predicted_n} generated tokens"
                    )
                continue
            timing = matches[0]
            timings.remove(timing)
            if math.isnan(sample.server_prompt_s):
                sample.server_prompt_s = timing.prompt_ms / 1000
                sample.server_tok_s = 1000 * timing.eval_n / timing.eval_ms
            else:
                sample.log_vs_stream_ms = timing.prompt_ms - 1000 * sample.server_prompt_s
        return problems


async def wait_health(client: httpx.AsyncClient, url: str, limit: float) -> None:
    with trio.fail_after(limit):
        while True:
            try:
                if (await client.get(url)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await trio.sleep(0.005)


async def cold_start_direct(client: httpx.AsyncClient, runs: int) -> list[float]:
    """llama-server spawned by hand: spawn → /health 200, polled every 5 ms."""
    times = []
    for _ in range(runs):
        port = free_port()
        start = time.perf_counter()
        proc = subprocess.Popen(
            llama_cmd(port, parallel=2, threads=THREADS),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            await wait_health(client, f"http://127.0.0.1:{port}/health", 60)
            times.append(time.perf_counter() - start)
        finally:
            proc.terminate()
            proc.wait(10)
    return times


async def cold_start_trioserve(client: httpx.AsyncClient, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        response = await client.post(f"/admin/models/{MODEL}/unload")
        response.raise_for_status()
        start = time.perf_counter()
        response = await client.post(f"/admin/models/{MODEL}/load")
        response.raise_for_status()
        times.append(time.perf_counter() - start)
    return times


async def compare(
    client: httpx.AsyncClient,
    targets: dict[str, str],
    rounds: int,
    warmup: int,
    max_tokens: int,
    concurrency: int,
    apis: dict[str, str] | None = None,
    log: LlamaLog | None = None,
) -> tuple[dict[str, list[Sample]], dict[str, list[str]]]:
    """The same prompts to each target, interleaved, the order alternating every round.
    ``apis``: each target's API (default chat); ``log``: read after each target's requests.

    A failed request is recorded, not fatal: the failures are part of the result."""
    samples: dict[str, list[Sample]] = {name: [] for name in targets}
    failures: dict[str, list[str]] = {name: [] for name in targets}
    names = list(targets)
    for round_no in range(warmup + rounds):
        for i in range(len(PROMPTS)):
            order = names if (round_no + i) % 2 == 0 else names[::-1]
            for name in order:
                results: list[Sample] = []

                api = (apis or {}).get(name, "chat")

                async def one(
                    p: str,
                    tokens: int,
                    name: str = name,
                    out: list[Sample] = results,
                    api: str = api,
                ) -> None:
                    try:
                        out.append(await stream_once(client, targets[name], p, tokens, api))
                    except RuntimeError as exc:
                        failures[name].append(str(exc))

                async with trio.open_nursery() as nursery:
                    for k in range(concurrency):
                        # Messages' streams at once ask for different numbers of tokens, so
                        # that each finds its own task in the log (their prompts, cached, may
                        # leave the same number of tokens to process).
                        tokens = max_tokens + (k if api == "messages" else 0)
                        nursery.start_soon(one, PROMPTS[(i + k) % len(PROMPTS)], tokens)
                if log is not None:
                    unmatched = await log.fill(results, len(results))
                    failures[name] += unmatched
                    results = [s for s in results if not math.isnan(s.server_prompt_s)]
                if round_no >= warmup:
                    samples[name].extend(results)
    return samples, failures


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def summary(samples: list[Sample]) -> dict[str, float]:
    if not samples:
        return {"n": 0}
    checked = [abs(s.log_vs_stream_ms) for s in samples if s.log_vs_stream_ms is not None]
    extra = {"log_vs_stream_max_ms": max(checked)} if checked else {}
    return {
        **extra,
        "n": len(samples),
        "tok_s_p50": statistics.median(s.tok_s for s in samples),
        "ttft_p50_ms": 1000 * statistics.median(s.ttft for s in samples),
        "ttft_p90_ms": 1000 * pct([s.ttft for s in samples], 90),
        "server_tok_s_p50": statistics.median(s.server_tok_s for s in samples),
        "kept_p50": statistics.median(s.kept for s in samples),
        "ttft_beyond_prompt_p50_ms": 1000
        * statistics.median(s.ttft_beyond_prompt for s in samples),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    if missing():
        sys.exit(f"{', '.join(missing())} missing: run `make real-model` first")
    trioserve = Path(sys.executable).with_name("trioserve")
    result: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "load_before": os.getloadavg()}}
    with tempfile.TemporaryDirectory(prefix="trioserve-bench-") as tmpdir:
        tmp = Path(tmpdir)
        config, base = daemon_config(
            tmp / "bench.toml",
            tmp / "state",
            {MODEL: llama_model(parallel=2, threads=THREADS)},
            supervisor={"start_timeout": 60, "stop_grace": 5},
        )
        direct_cold: list[float] = []
        if args.cold_runs:
            async with httpx.AsyncClient(trust_env=False, timeout=120) as plain:
                progress("cold starts, llama-server alone")
                direct_cold = await cold_start_direct(plain, args.cold_runs)
        log = (tmp / "daemon.log").open("wb")
        daemon = subprocess.Popen(
            [str(trioserve), "start", "--config", str(config), "--log-level", "warning"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            # A new connection per request, for both paths: llama-server closes its connection
            # after every streamed answer (while announcing keep-alive), so a pooled one may
            # be dead by the time it is reused. Loopback connects cost ~0.1 ms on both paths.
            limits = httpx.Limits(max_connections=8, max_keepalive_connections=0)
            async with httpx.AsyncClient(
                base_url=base,
                trust_env=False,
                timeout=120,
                limits=limits,
                auth=AdminAuth(tmp / "state"),  # the loads and unloads
            ) as client:
                await wait_health(client, base + "/health", 30)
                trioserve_cold: list[float] = []
                if args.cold_runs:
                    progress("cold starts through trioserve")
                    trioserve_cold = await cold_start_trioserve(client, args.cold_runs)
                else:
                    (await client.post(f"/admin/models/{MODEL}/load")).raise_for_status()
                status = (await client.get("/admin/status")).json()
                entry = status["models"][MODEL]
                targets, apis = {}, {}
                for api in args.api:
                    direct, relayed = target_names(api, args.api)
                    targets[direct] = f"http://127.0.0.1:{entry['port']}{API_PATHS[api]}"
                    targets[relayed] = base + API_PATHS[api]
                    apis[direct] = apis[relayed] = api
                llama_log = None
                if "messages" in args.api:
                    llama_log = LlamaLog(client)
                    await llama_log.skip()
                daemon_proc = psutil.Process(daemon.pid)
                llama_proc = psutil.Process(entry["pid"])
                cpu_before = cpu_seconds(daemon_proc), cpu_seconds(llama_proc)
                progress("1 stream at a time, direct and through trioserve, interleaved")
                single, single_failed = await compare(
                    client, targets, args.rounds, 1, args.max_tokens, 1, apis, llama_log
                )
                cpu_after = cpu_seconds(daemon_proc), cpu_seconds(llama_proc)
                pair: dict[str, list[Sample]] = {name: [] for name in targets}
                pair_failed: dict[str, list[str]] = {name: [] for name in targets}
                if not args.single_only:
                    progress("2 streams at a time")
                    pair, pair_failed = await compare(
                        client,
                        targets,
                        max(1, args.rounds // 2),
                        1,
                        args.max_tokens,
                        2,
                        apis,
                        llama_log,
                    )
        except BaseException:
            log.flush()
            tail = (tmp / "daemon.log").read_text(errors="replace").splitlines()[-30:]
            print("trioserve's log:\n" + "\n".join(tail), file=sys.stderr)
            raise
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
            log.close()
    result["machine"]["load_after"] = os.getloadavg()
    result["failures"] = {name: single_failed[name] + pair_failed[name] for name in single_failed}
    result["single"] = {name: summary(s) for name, s in single.items()}
    if not args.single_only:
        result["concurrent2"] = {name: summary(s) for name, s in pair.items()}
    tokens_relayed = sum(
        s.tokens for api in args.api for s in single[target_names(api, args.api)[1]]
    )
    result["cpu"] = {
        "daemon_s": cpu_after[0] - cpu_before[0],
        "llama_server_s": cpu_after[1] - cpu_before[1],
        "daemon_ms_per_relayed_token": 1000 * (cpu_after[0] - cpu_before[0]) / tokens_relayed,
    }
    if args.cold_runs:
        result["cold_start"] = {
            "direct_p50_s": statistics.median(direct_cold),
            "trioserve_p50_s": statistics.median(trioserve_cold),
            "direct_runs": direct_cold,
            "trioserve_runs": trioserve_cold,
        }
    result["params"] = {
        "rounds": args.rounds,
        "prompts": len(PROMPTS),
        "max_tokens": args.max_tokens,
        "warmup_rounds": 1,
        "threads": THREADS,
    }
    if args.api != ["chat"]:
        result["params"]["apis"] = args.api
    return result


def target_names(api: str, apis: list[str]) -> tuple[str, str]:
    """The names of ``api``'s direct and relayed targets: plain when it is the only one."""
    return ("direct", "trioserve") if len(apis) == 1 else (f"{api} direct", f"{api} trioserve")


def print_table(r: dict[str, Any]) -> None:
    apis = r["params"].get("apis", ["chat"])
    if len(apis) > 1 or apis != ["chat"]:
        print(f"APIs: {', '.join(f'{api} ({API_PATHS[api]})' for api in apis)}")
    rows: list[tuple[str, ...]] = [("", "direct", "trioserve", "trioserve vs direct")]
    for api in apis:
        direct, relayed = target_names(api, apis)
        rows += api_rows(r, direct, relayed, "" if len(apis) == 1 else f"{api}: ")
    cold = r.get("cold_start")
    if cold:
        rows.append(
            (
                "cold start p50 (spawn → ready)",
                f"{cold['direct_p50_s']:.2f} s",
                f"{cold['trioserve_p50_s']:.2f} s",
                f"{cold['trioserve_p50_s'] - cold['direct_p50_s']:+.2f} s",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print(
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    direct, relayed = target_names(apis[0], apis)
    d, t = r["single"][direct], r["single"][relayed]
    p = r["params"]
    cpu = r["cpu"]
    print(
        f"\n{p['prompts']} prompts x {p['rounds']} rounds per path after {p['warmup_rounds']} "
        f"warm-up round, {p['max_tokens']} tokens each (ignore_eos), streaming, llama-server "
        f"--threads {p['threads']}; its "
        f"own rate p50 {d['server_tok_s_p50']:.1f} / {t['server_tok_s_p50']:.1f} tokens/s."
    )
    checked = [
        s["log_vs_stream_max_ms"]
        for phase in ("single", "concurrent2")
        for s in r.get(phase, {}).values()
        if "log_vs_stream_max_ms" in s
    ]
    if "messages" in apis:
        print(
            "Messages: llama-server drops ignore_eos (its answers end where they end, the same "
            "for both paths at temperature 0), and its timings come from its log (its stream "
            "has none)"
            + (
                f"; log vs stream timings, the others: prompt time at most {max(checked):.3f} "
                "ms apart"
                if checked
                else ""
            )
            + "."
        )
    for name, failed in r["failures"].items():
        if failed:
            print(f"{name}: {len(failed)} failed requests, e.g. {failed[0]}")
    m = r["machine"]
    print(
        f"Load average (1 min) {m['load_before'][0]:.2f} before, {m['load_after'][0]:.2f} after, "
        f"on {m['cpus']} CPUs: anything else running skews the absolute figures."
    )
    print(
        f"CPU while the single-stream runs: trioserve {cpu['daemon_s']:.2f} s "
        f"({cpu['daemon_ms_per_relayed_token']:.3f} ms per relayed token"
        + (", reads of llama-server's log included" if "messages" in apis else "")
        + f"), llama-server {cpu['llama_server_s']:.2f} s."
    )


def api_rows(r: dict[str, Any], direct: str, relayed: str, prefix: str) -> list[tuple[str, ...]]:
    """The rows of one API's pair of targets, each phase."""
    rows: list[tuple[str, ...]] = []
    for phase, label in (("single", "1 stream"), ("concurrent2", "2 streams")):
        if phase not in r or not r[phase][relayed]["n"] or not r[phase][direct]["n"]:
            continue
        d, t = r[phase][direct], r[phase][relayed]
        label = prefix + label
        rows += [
            (
                f"tokens/s p50, {label}",
                f"{d['tok_s_p50']:.1f}",
                f"{t['tok_s_p50']:.1f}",
                f"{t['tok_s_p50'] / d['tok_s_p50']:.3f}x",
            ),
            (
                f"  share of llama-server's own rate, {label}",
                f"{d['kept_p50']:.3f}",
                f"{t['kept_p50']:.3f}",
                f"{t['kept_p50'] / d['kept_p50']:.3f}x",
            ),
            (
                f"TTFT p50, {label}",
                f"{d['ttft_p50_ms']:.1f} ms",
                f"{t['ttft_p50_ms']:.1f} ms",
                f"{t['ttft_p50_ms'] - d['ttft_p50_ms']:+.1f} ms",
            ),
            (
                f"  TTFT less prompt processing, {label}",
                f"{d['ttft_beyond_prompt_p50_ms']:.1f} ms",
                f"{t['ttft_beyond_prompt_p50_ms']:.1f} ms",
                f"{t['ttft_beyond_prompt_p50_ms'] - d['ttft_beyond_prompt_p50_ms']:+.1f} ms",
            ),
            (
                f"TTFT p90, {label}",
                f"{d['ttft_p90_ms']:.1f} ms",
                f"{t['ttft_p90_ms']:.1f} ms",
                f"{t['ttft_p90_ms'] - d['ttft_p90_ms']:+.1f} ms",
            ),
        ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="measured rounds over the prompts")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--cold-runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="llama-server --threads")
    parser.add_argument(
        "--api",
        nargs="+",
        choices=list(API_PATHS),
        default=["chat"],
        help="the API(s) of the streams; several are interleaved in one run",
    )
    parser.add_argument(
        "--single-only", action="store_true", help="1 stream at a time only (not 2 at once)"
    )
    parser.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    args = parser.parse_args()
    global THREADS
    THREADS = args.threads
    result = trio.run(main_async, args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)


if __name__ == "__main__":
    main()
