"""Every API trioserve relays: the latency it adds to a small request of each, against the same
echo backend called directly in the same run; and, with ``--real``, what the streams of the
generating APIs (chat, Responses, Messages) keep of a real llama-server's pace.

Echo part. trioserve runs as its own process (``trioserve start``) with one echo model that
answers one token (``tiny``, ``--tokens 1``); ``/upstream`` is open to users
(``upstream_passthrough = "users"``, no keys) so that it is measured as any other path. The
client is this script again (``--client``), another process, so that neither the daemon nor
the parent's bookkeeping shares its loop: it sends one small request at a time, one connection
each (``Connection: close``, read to the close, as ``bench/load.py``'s (c) does), and
alternates everything: each round takes every API once, in an order rotated every round, and
for each API a direct and a relayed request, the pair's order swapped every round. So the two
paths of an API see the same machine at the same moments, and the difference of their p50s is
trioserve's (warm-up rounds discarded). ``--repeat N`` runs the client N times (N processes,
one daemon): each run's added p50 is shown, and their median.

The paths, and the direct request each is compared with: ``/v1/chat/completions``,
``/v1/completions``, ``/v1/responses`` and ``/v1/messages`` (non-streaming: trioserve sends
them upstream as streams and assembles the answer; direct, the backend answers them whole),
``/v1/embeddings``, ``/v1/rerank``, ``/tokenize``, ``/v1/messages/count_tokens``,
``/v1/responses/input_tokens``, ``/apply-template``, ``/completion``,
``/upstream/tiny/props`` (direct: ``GET /props``), ``/v1/audio/speech`` (a WAV streamed
through), ``/v1/audio/transcriptions`` (a multipart upload of 16 KiB).

``--real``: ``bench/real_model.py --api chat responses messages`` in this process: llama-server
(Gemma 3 270M from ``make real-model``) behind trioserve, streaming requests of the three
APIs interleaved, each through trioserve and directly; per API the tokens/s share of
llama-server's own rate (relayed vs direct) and the time to first token added, less
llama-server's prompt time (Messages' from llama-server's log: see that file).

    .venv/bin/python bench/apis.py [--rounds 400] [--repeat 3] [--json]
    .venv/bin/python bench/apis.py --real [--real-rounds 4] [--max-tokens 64] [--single-only]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import trio

# The test helpers (a free port, configs, the admin's token) and the other benches are shared.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import real_model
from bench._daemon import wait_healthy
from tests.support.admin import AdminAuth
from tests.support.config import daemon_config, echo_cmd

MODEL = "tiny"
TRIOSERVE = str(Path(sys.executable).parent / "trioserve")
HERE = Path(__file__).resolve()
WARMUP_ROUNDS = 20
# A multipart upload: the model's field, then a small "audio" file.
BOUNDARY = "benchboundary7MA4YWxkTrZu0gW"
AUDIO = b"RIFF\x00\x00\x00\x00WAVEfmt " + bytes(16 * 1024 - 16)


@dataclass(frozen=True)
class Case:
    """One API: its relayed request, and the direct request to the backend it matches."""

    name: str
    path: str  # through trioserve
    direct_path: str
    body: bytes
    method: str = "POST"
    content_type: str = "application/json"


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps({"model": MODEL, **body}).encode()


def _multipart() -> bytes:
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{MODEL}\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()
    return head + AUDIO + f"\r\n--{BOUNDARY}--\r\n".encode()


MESSAGES = [{"role": "user", "content": "a b c"}]
CASES = [
    Case("chat", "/v1/chat/completions", "", _json({"messages": MESSAGES})),
    Case("completions", "/v1/completions", "", _json({"prompt": "a b c"})),
    Case("responses", "/v1/responses", "", _json({"input": "a b c"})),
    Case("messages", "/v1/messages", "", _json({"max_tokens": 16, "messages": MESSAGES})),
    Case("embeddings", "/v1/embeddings", "", _json({"input": "a b c"})),
    Case("rerank", "/v1/rerank", "", _json({"query": "a", "documents": ["a b", "c d"]})),
    Case("tokenize", "/tokenize", "", _json({"content": "a b c"})),
    Case("count_tokens", "/v1/messages/count_tokens", "", _json({"messages": MESSAGES})),
    Case("input_tokens", "/v1/responses/input_tokens", "", _json({"input": "a b c"})),
    Case("apply-template", "/apply-template", "", _json({"messages": MESSAGES})),
    Case("/completion", "/completion", "", _json({"prompt": "a b c"})),
    Case("/upstream props", f"/upstream/{MODEL}/props", "/props", b"", method="GET"),
    Case("speech", "/v1/audio/speech", "", _json({"input": "a b c", "voice": "alloy"})),
    Case(
        "transcription",
        "/v1/audio/transcriptions",
        "",
        _multipart(),
        content_type=f"multipart/form-data; boundary={BOUNDARY}",
    ),
]


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the client (``--client``, its own process) -------------------------------------------------


def request_bytes(case: Case, path: str, port: int) -> bytes:
    head = f"{case.method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
    if case.method != "GET" or case.body:
        head += f"Content-Type: {case.content_type}\r\nContent-Length: {len(case.body)}\r\n"
    return (head + "\r\n").encode() + case.body


def exchange(port: int, request: bytes) -> tuple[float, int]:
    """One request on a connection of its own, read to the close: (seconds, status)."""
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(request)
        first = sock.recv(65536)
        while sock.recv(65536):
            pass
    elapsed = time.perf_counter() - start
    status = int(first.split(b" ", 2)[1]) if first.startswith(b"HTTP/") else 0
    return elapsed, status


def client(spec: dict[str, Any]) -> dict[str, Any]:
    """The alternating rounds (see the docstring); latencies per API and path, in seconds."""
    cases = [Case(**case) for case in spec["cases"]]
    ports = {"direct": spec["direct_port"], "relayed": spec["relayed_port"]}
    requests = {
        (case.name, side): request_bytes(
            case, case.path if side == "relayed" else case.direct_path or case.path, ports[side]
        )
        for case in cases
        for side in ports
    }
    latencies: dict[str, dict[str, list[float]]] = {
        case.name: {"direct": [], "relayed": []} for case in cases
    }
    failed: dict[str, list[str]] = {}
    warmup, rounds = spec["warmup"], spec["rounds"]
    for round_no in range(warmup + rounds):
        shift = round_no % len(cases)
        sides = ("direct", "relayed") if round_no % 2 == 0 else ("relayed", "direct")
        for case in cases[shift:] + cases[:shift]:
            for side in sides:
                elapsed, status = exchange(ports[side], requests[case.name, side])
                if status != 200:
                    failed.setdefault(case.name, []).append(f"{side}: {status}")
                elif round_no >= warmup:
                    latencies[case.name][side].append(elapsed)
    return {"latencies": latencies, "failed": failed, "client_cpu_s": time.process_time()}


# -- the echo part ------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


@contextmanager
def echo_daemon(tmp: Path) -> Iterator[tuple[int, int, psutil.Process, psutil.Process]]:
    """``trioserve start`` with the ``tiny`` echo model, loaded: (trioserve's port, the
    backend's port, the daemon's process, the backend's process)."""
    state_dir = tmp / "state"
    config, base = daemon_config(
        tmp / "apis.toml",
        state_dir,
        {MODEL: {"cmd": echo_cmd("--tokens", "1"), "ttl": 0, "max_concurrency": 64}},
        server={"upstream_passthrough": "users"},
    )
    log_path = tmp / "daemon.log"
    with log_path.open("wb") as log:
        daemon = subprocess.Popen(
            [TRIOSERVE, "start", "--config", str(config), "--log-level", "warning"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_healthy(base, daemon)
        with httpx.Client(
            base_url=base, timeout=60, trust_env=False, auth=AdminAuth(state_dir)
        ) as admin:
            admin.post(f"/admin/models/{MODEL}/load").raise_for_status()
            entry = admin.get("/admin/status").json()["models"][MODEL]
        port = int(base.rsplit(":", 1)[1])
        yield port, int(entry["port"]), psutil.Process(daemon.pid), psutil.Process(entry["pid"])
    except BaseException:
        tail = log_path.read_text(errors="replace").splitlines()[-30:]
        print("trioserve's log:\n" + "\n".join(tail), file=sys.stderr)
        raise
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def measure_echo(args: argparse.Namespace) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="trioserve-bench-apis-") as tmpdir,
        echo_daemon(Path(tmpdir)) as (port, backend_port, daemon, backend),
    ):
        spec = {
            "cases": [asdict(case) | {"body": case.body.decode("latin-1")} for case in CASES],
            "direct_port": backend_port,
            "relayed_port": port,
            "rounds": args.rounds,
            "warmup": WARMUP_ROUNDS,
        }
        for k in range(args.repeat):
            progress(
                f"run {k + 1}/{args.repeat}: {len(CASES)} APIs x {args.rounds} rounds "
                f"(+{WARMUP_ROUNDS} warm-up), direct and relayed alternating"
            )
            cpu = cpu_seconds(daemon), cpu_seconds(backend)
            out = subprocess.run(
                [sys.executable, str(HERE), "--client"],
                input=json.dumps(spec),
                capture_output=True,
                text=True,
                check=True,
            )
            run = json.loads(out.stdout)
            run["cpu_s"] = {
                "daemon": cpu_seconds(daemon) - cpu[0],
                "backend": cpu_seconds(backend) - cpu[1],
                "client": run.pop("client_cpu_s"),
            }
            runs.append(run)
    return {"runs": [summarise(run) for run in runs], "rounds": args.rounds}


def summarise(run: dict[str, Any]) -> dict[str, Any]:
    apis = {}
    for name, sides in run["latencies"].items():
        d, r = sides["direct"], sides["relayed"]
        apis[name] = {
            "n": min(len(d), len(r)),
            "direct_p50_ms": 1000 * pct(d, 0.5),
            "relayed_p50_ms": 1000 * pct(r, 0.5),
            "added_p50_ms": 1000 * (pct(r, 0.5) - pct(d, 0.5)),
            "ratio_p50": pct(r, 0.5) / pct(d, 0.5) if d and r else float("nan"),
            "added_p99_ms": 1000 * (pct(r, 0.99) - pct(d, 0.99)),
        }
    return {"apis": apis, "failed": run["failed"], "cpu_s": run["cpu_s"]}


def print_echo(result: dict[str, Any]) -> None:
    runs = result["runs"]
    print(
        f"Added latency of a small request, echo backend (1 token), {result['rounds']} "
        f"alternating pairs per API per run, {len(runs)} run(s); p50s of the last run, the "
        "added p50 of every run and their median"
    )
    rows: list[tuple[str, ...]] = [
        ("API", "path", "direct p50", "trioserve p50", "ratio", "added p50", "each run", "p99+")
    ]
    last = runs[-1]["apis"]
    for case in CASES:
        each = [run["apis"][case.name]["added_p50_ms"] for run in runs]
        s = last[case.name]
        rows.append(
            (
                case.name,
                ("GET " if case.method == "GET" else "") + case.path,
                f"{s['direct_p50_ms']:.2f} ms",
                f"{s['relayed_p50_ms']:.2f} ms",
                f"{s['ratio_p50']:.2f}x",
                f"{statistics.median(each):+.2f} ms",
                ", ".join(f"{v:+.2f}" for v in each),
                f"{s['added_p99_ms']:+.2f} ms",
            )
        )
    print_rows(rows)
    for k, run in enumerate(runs, 1):
        cpu = run["cpu_s"]
        failed = {name: len(f) for name, f in run["failed"].items()}
        print(
            f"run {k}: CPU s daemon {cpu['daemon']:.1f}, backend {cpu['backend']:.1f}, client "
            f"{cpu['client']:.1f}" + (f"; non-200 answers: {failed}" if failed else "")
        )


def print_rows(rows: list[tuple[str, ...]]) -> None:
    """Columns padded to their widest cell; the first two left-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(
                cell.ljust(w) if i < 2 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )


# -- the real part ------------------------------------------------------------------------------

REAL_APIS = ["chat", "responses", "messages"]


def measure_real(args: argparse.Namespace) -> dict[str, Any]:
    real_model.THREADS = args.threads
    options = argparse.Namespace(
        rounds=args.real_rounds,
        max_tokens=args.max_tokens,
        cold_runs=0,
        threads=args.threads,
        api=REAL_APIS,
        single_only=args.single_only,
    )
    result: dict[str, Any] = trio.run(real_model.main_async, options)
    return result


def print_real(r: dict[str, Any]) -> None:
    p = r["params"]
    print(
        f"\nReal llama-server (Gemma 3 270M, --threads {p['threads']}), streaming, "
        f"{p['prompts']} prompts x {p['rounds']} rounds per path after {p['warmup_rounds']} "
        f"warm-up round, {p['max_tokens']} tokens asked, the APIs and paths interleaved"
    )
    rows: list[tuple[str, ...]] = [
        (
            "API",
            "streams",
            "tok/s direct",
            "tok/s trioserve",
            "share of own rate d / t",
            "share vs direct",
            "TTFT-prompt d / t",
            "TTFT added",
        )
    ]
    for phase, streams in (("single", "1"), ("concurrent2", "2")):
        for api in REAL_APIS:
            if phase not in r:
                continue
            d, t = r[phase][f"{api} direct"], r[phase][f"{api} trioserve"]
            if not d["n"] or not t["n"]:
                rows.append((api, streams, "-", "-", "-", "-", "-", "no samples"))
                continue
            added = t["ttft_beyond_prompt_p50_ms"] - d["ttft_beyond_prompt_p50_ms"]
            rows.append(
                (
                    api,
                    streams,
                    f"{d['tok_s_p50']:.1f}",
                    f"{t['tok_s_p50']:.1f}",
                    f"{d['kept_p50']:.3f} / {t['kept_p50']:.3f}",
                    f"{t['kept_p50'] / d['kept_p50']:.4f}x",
                    f"{d['ttft_beyond_prompt_p50_ms']:.1f} / "
                    f"{t['ttft_beyond_prompt_p50_ms']:.1f} ms",
                    f"{added:+.1f} ms",
                )
            )
    print_rows(rows)
    checked = [
        s["log_vs_stream_max_ms"]
        for phase in ("single", "concurrent2")
        for s in r.get(phase, {}).values()
        if "log_vs_stream_max_ms" in s
    ]
    if checked:
        print(
            "llama-server's log vs its streams' timings (chat, responses): prompt time at most "
            f"{max(checked):.3f} ms apart; Messages' timings are the log's."
        )
    for name, failed in r["failures"].items():
        if failed:
            print(f"{name}: {len(failed)} failed requests, e.g. {failed[0]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rounds", type=int, default=400, help="pairs per API per run")
    parser.add_argument("--repeat", type=int, default=3, help="client runs (processes)")
    parser.add_argument("--real", action="store_true", help="the real-model part, instead")
    parser.add_argument("--real-rounds", type=int, default=4, help="--real: rounds of prompts")
    parser.add_argument("--max-tokens", type=int, default=64, help="--real: tokens per stream")
    parser.add_argument("--threads", type=int, default=1, help="--real: llama-server --threads")
    parser.add_argument("--single-only", action="store_true", help="--real: 1 stream at a time")
    parser.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        spec = json.loads(sys.stdin.read())
        for case in spec["cases"]:
            case["body"] = case["body"].encode("latin-1")
        print(json.dumps(client(spec)))
        return
    result: dict[str, Any] = {"command": " ".join(["bench/apis.py", *sys.argv[1:]])}
    result["load_before"] = os.getloadavg()
    if args.real:
        result["real"] = measure_real(args)
    else:
        result["echo"] = measure_echo(args)
    result["load_after"] = os.getloadavg()
    if args.json:
        print(json.dumps(result, indent=2))
        return
    if "echo" in result:
        print_echo(result["echo"])
    if "real" in result:
        print_real(result["real"])
    print(
        f"Load average (1 min) {result['load_before'][0]:.2f} before, "
        f"{result['load_after'][0]:.2f} after. Command: .venv/bin/python {result['command']}"
    )


if __name__ == "__main__":
    main()
