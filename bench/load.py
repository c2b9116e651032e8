"""Load benchmark: trioserve against calling the same echo backend directly, in the same run.

Starts the daemon (the real console script) with four echo models, loads them, finds each
backend's port from /admin/status, and runs every scenario twice with the same load client
(tests/support/load_client.py, its own process): once straight at the backend, once through
trioserve. Liveness probes run from a third process. Prints each figure and its ratio to direct.

    .venv/bin/python bench/load.py            # all scenarios
    .venv/bin/python bench/load.py --only b d # some
    .venv/bin/python bench/load.py --repeat 5 # (b) as 5 pairs, median ratio
    .venv/bin/python bench/load.py --only c --budgets user  # as a configured user (its key)
    .venv/bin/python bench/load.py --only c --budgets on    # ... with budgets that never trigger

``--budgets``: ``off`` (default) sends no key, as before; ``user`` configures one user with a
key and sends it on every request; ``on`` gives that user every budget (requests and tokens
per minute, tokens per day), too large to refuse anything, so that each request pays for the
checks, the counting and the ``x-ratelimit-*`` headers. ``user`` against ``on``, alternated in
one sitting, is what budgets cost on the request path.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from _daemon import wait_healthy

# A free port as the tests take one, and the load client the tests' probe uses: the helpers
# are shared with them.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support import load_client
from tests.support.admin import AdminAuth
from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
CLIENT = [sys.executable, str(Path(load_client.__file__))]
BENCH_KEY = "sk-bench"
# Budgets no load of this bench reaches (2000 requests of a few tokens each, in seconds).
HUGE_BUDGETS = {
    "max_requests_per_minute": 10**9,
    "max_tokens_per_minute": 10**12,
    "max_tokens_per_day": 10**15,
}
TRIOSERVE = str(Path(sys.executable).parent / "trioserve")


def _raise_fd_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _config(state_dir: str, port: int, budgets: str = "off") -> str:
    echo = '"{python}", "-m", "trioserve.backends.echo", "--port", "{port}"'
    models = {
        "slow": "--response-delay 5 --tokens 8",
        "stream": "--tokens 50 --token-delay 0.02",
        "fast": "--tokens 2000 --token-delay 0",
        "tiny": "--tokens 1",
    }
    lines = [
        "[server]",
        f"port = {port}",
        f'state_dir = "{state_dir}"',
        "[supervisor]",
        "max_loaded = 4",
        "port_range = [23000, 23099]",
    ]
    for name, opts in models.items():
        extra = ", ".join(f'"{o}"' for o in opts.split())
        lines += [
            f"[models.{name}]",
            f"cmd = [{echo}, {extra}]",
            "ttl = 0",
            "max_concurrency = 1100",
            "max_queue = 2000",
        ]
    if budgets != "off":
        lines += ["[users.bench]", f'api_keys = ["{BENCH_KEY}"]']
        if budgets == "on":
            lines += [f"{key} = {value}" for key, value in HUGE_BUDGETS.items()]
    return "\n".join(lines) + "\n"


PROFILE: dict[str, Any] = {}


def _start_profile(path: str) -> subprocess.Popen[bytes] | None:
    if not PROFILE.get("dir"):
        return None
    PROFILE["n"] = PROFILE.get("n", 0) + 1
    out = Path(PROFILE["dir"]) / f"daemon-{PROFILE['n']}.txt"
    spy = str(Path(sys.executable).parent / "py-spy")
    proc = subprocess.Popen(
        [spy, "record", "-p", str(PROFILE["pid"]), "-o", str(out), "-r", "200", "-f", "raw"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1)  # py-spy attaches
    return proc


def _run_client(*args: str, pids: list[int] | None = None) -> dict[str, Any]:
    """Run one load; with ``pids``, also the CPU seconds each of them and the client used."""
    cpu = _CpuWatch(pids or [])
    out = subprocess.run(
        [*CLIENT, *args], capture_output=True, text=True, check=True, preexec_fn=_raise_fd_limit
    )
    cpu.stop()
    result: dict[str, Any] = json.loads(out.stdout)
    result["cpu"] = cpu.summary() + f", {result.get('client_cpu_s', 0):.1f}"
    return result


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            time.sleep(0.05)


def _body(model: str, stream: bool) -> str:
    return json.dumps(
        {"model": model, "stream": stream, "messages": [{"role": "user", "content": "a b c"}]}
    )


def _both(
    direct: str,
    relayed: str,
    path: str,
    extra: list[str],
    probe: bool = False,
    pids: list[int] | None = None,
    **kw: Any,
) -> tuple[
    dict[str, Any],
    dict[str, Any],
    dict[str, Any] | None,
    dict[str, Any] | None,
    dict[str, Any] | None,
]:
    results = []
    probes: list[dict[str, Any] | None] = []
    floor: dict[str, Any] | None = None
    for base in (direct, relayed):
        probe_procs = []
        if probe:
            targets = [base]
            if base == relayed and kw.get("floor_url"):
                targets.append(kw["floor_url"])
            probe_procs = [
                subprocess.Popen(
                    [*CLIENT, "--probe", target + "/health", "--seconds", str(kw["probe_s"])],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                for target in targets
            ]
        # The daemon's CPU only counts in the relayed run; the backend's in both.
        watched = (pids or [])[1:] if base == direct else pids
        spy = _start_profile(path) if base == relayed else None
        results.append(_run_client("--url", base + path, *extra, pids=watched))
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        outs = [json.loads(p.communicate()[0]) for p in probe_procs]
        probes.append(outs[0] if outs else None)
        if len(outs) > 1:
            floor = outs[1]
    return results[0], results[1], probes[0], probes[1], floor


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", default=["a", "b", "c", "d", "e"])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument(
        "--repeat", type=int, default=1, help="pairs of (b) runs; ratios are their median"
    )
    parser.add_argument(
        "--profile", metavar="DIR", help="py-spy the daemon during each relayed run into DIR"
    )
    parser.add_argument(
        "--budgets",
        choices=["off", "user", "on"],
        default="off",
        help="off: no key; user: a configured user's key; on: that user with huge budgets",
    )
    args = parser.parse_args()
    if args.budgets != "off":
        # Once a user has a key, /v1 needs one: every scenario's client sends it (the
        # backend, called directly, ignores it).
        os.environ["LOAD_CLIENT_HEADER"] = f"Authorization: Bearer {BENCH_KEY}"
    _raise_fd_limit()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "bench.toml"
        conf.write_text(_config(tmp, port, args.budgets))
        daemon = subprocess.Popen(
            [TRIOSERVE, "start", "--config", str(conf), "--log-level", "warning"],
            preexec_fn=_raise_fd_limit,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, daemon)
            admin = AdminAuth(Path(tmp))  # the loads are admin writes
            with httpx.Client(base_url=url, timeout=60, trust_env=False, auth=admin) as client:
                for name in ("slow", "stream", "fast", "tiny"):
                    client.post(f"/admin/models/{name}/load").raise_for_status()
                models = client.get("/admin/status").json()["models"]
            ports = {name: info["port"] for name, info in models.items()}
            PROFILE.update(dir=args.profile, pid=daemon.pid)
            floor_port = free_port()
            floor_server = subprocess.Popen(
                [sys.executable, str(ROOT / "bench" / "_idle_health.py"), str(floor_port)],
                stdout=subprocess.PIPE,
            )
            assert floor_server.stdout is not None
            floor_server.stdout.readline()
            sampler = RssSampler(daemon.pid)
            sampler.start()
            try:
                rows = _scenarios(args, url, ports, daemon.pid, f"http://127.0.0.1:{floor_port}")
            finally:
                floor_server.kill()
                floor_server.wait()
            sampler.stop.set()
            sampler.join()
            rows.append(("e", "daemon RSS at peak", f"{sampler.peak / 2**20:.1f} MiB", "", ""))
            _print(rows)
        finally:
            daemon.terminate()
            daemon.wait(30)


def _scenarios(
    args: argparse.Namespace, url: str, ports: dict[str, int], daemon_pid: int, floor_url: str
) -> list[tuple[str, str, str, str, str]]:
    rows: list[tuple[str, str, str, str, str]] = []
    chat = "/v1/chat/completions"

    def base(model: str) -> str:
        return f"http://127.0.0.1:{ports[model]}"

    def both(model: str, n: int, stream: bool, **options: Any) -> Any:
        """``_both`` for ``n`` requests to ``model``, all at once."""
        clients = ["--concurrency", str(n), "--requests", str(n), "--body", _body(model, stream)]
        return _both(base(model), url, chat, clients, **options)

    if "a" in args.only:
        d, r, _, _, _ = both("slow", 10, False)
        mean_d = statistics.mean(d["latencies"]) if d["latencies"] else float("nan")
        mean_r = statistics.mean(r["latencies"]) if r["latencies"] else float("nan")
        rows.append(
            (
                "a",
                "10 users × 5 s: completed",
                f"{r['completed']}/10",
                f"direct {d['completed']}/10",
                "",
            )
        )
        rows.append(
            (
                "a",
                "mean latency ÷ 5 s",
                f"{mean_r / 5:.3f}",
                f"direct {mean_d / 5:.3f}",
                f"{mean_r / mean_d:.3f}×",
            )
        )
    if "b" in args.only:
        n = str(args.streams)
        runs = []
        for _ in range(args.repeat):
            runs.append(
                both(
                    "stream",
                    args.streams,
                    True,
                    probe=True,
                    probe_s=3,
                    pids=[daemon_pid, _pid_on_port(ports["stream"])],
                    floor_url=floor_url,
                )
            )
        rows += _streams_rows(n, runs)
    if "c" in args.only:
        # Paired: direct and relayed requests alternate, so both see the same machine.
        spy = _start_profile(chat)
        paired = _run_client(
            "--url",
            base("tiny") + chat,
            "--url2",
            url + chat,
            "--requests",
            "2000",
            "--body",
            _body("tiny", False),
            pids=[daemon_pid, _pid_on_port(ports["tiny"])],
        )
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        rows.append(("c", "CPU s (daemon, backend, client)", paired["cpu"], "(2000 each way)", ""))
        d = {"latencies": paired["latencies"][100:]}  # the first ones warm up
        r = {"latencies": paired["latencies2"][100:]}
        for q, label in ((0.5, "p50"), (0.99, "p99")):
            added = 1000 * (_pct(r["latencies"], q) - _pct(d["latencies"], q))
            rows.append(
                (
                    "c",
                    f"added latency {label}",
                    f"{added:.2f} ms",
                    f"direct {1000 * _pct(d['latencies'], q):.2f} ms",
                    "",
                )
            )
    if "d" in args.only:
        d, r, _, _, _ = both("fast", 64, True, pids=[daemon_pid, _pid_on_port(ports["fast"])])
        cd, cr = d["events"] / d["wall_s"], r["events"] / r["wall_s"]
        rows.append(
            ("d", "64 streams, chunks/s", f"{cr:,.0f}", f"direct {cd:,.0f}", f"{cr / cd:.3f}×")
        )
        rows.append(("d", "CPU s (daemon, backend, client)", r["cpu"], f"direct {d['cpu']}", ""))
    return rows


def _streams_rows(n: str, runs: list[Any]) -> list[tuple[str, str, str, str, str]]:
    """Rows for (b). With --repeat, each pair of runs (direct, then relayed) gives its own
    ratios, and the row shows their median: one pair swings with the machine by ±20 %."""
    rows: list[tuple[str, str, str, str, str]] = []
    ratios: dict[str, list[float]] = {"p50": [], "p99": []}
    for i, (d, r, pd, pr, floor) in enumerate(runs):
        assert pr is not None and pd is not None and floor is not None
        for q, label in ((0.5, "p50"), (0.99, "p99")):
            ratios[label].append(_pct(r["latencies"], q) / _pct(d["latencies"], q))
        if os.environ.get("BENCH_DEBUG"):
            slow = sorted(zip(pr["samples"], pr["offsets"], strict=True), reverse=True)[:8]
            print(
                f"b pair {i + 1}: slowest /health probes (ms, at s):",
                [(round(1e3 * a, 1), round(b, 2)) for a, b in slow],
            )
        if len(runs) > 1:
            print(
                f"b pair {i + 1}: p50 {ratios['p50'][-1]:.3f}×, p99 {ratios['p99'][-1]:.3f}×, "
                f"/health p99 {1000 * _pct(pr['samples'], 0.99):.1f} ms "
                f"(floor {1000 * _pct(floor['samples'], 0.99):.1f}), "
                f"CPU s (daemon, backend, client) {r['cpu']} / direct {d['cpu']}"
            )
    # The figures of the pair whose p50 ratio is the median.
    order = sorted(range(len(runs)), key=lambda i: ratios["p50"][i])
    d, r, pd, pr, floor = runs[order[len(order) // 2]]
    assert pr is not None and pd is not None and floor is not None
    completed = min(run[1]["completed"] for run in runs)
    rows.append(
        (
            "b",
            f"{n} streams: completed",
            f"{100 * completed / int(n):.1f}%",
            f"direct {100 * min(run[0]['completed'] for run in runs) / int(n):.1f}%",
            "",
        )
    )
    label_of = f"median of {len(runs)} pairs" if len(runs) > 1 else ""
    for q, label in ((0.5, "p50"), (0.99, "p99")):
        vr, vd = _pct(r["latencies"], q), _pct(d["latencies"], q)
        ratio = statistics.median(ratios[label])
        rows.append(
            ("b", f"stream latency {label}", f"{vr:.2f} s", f"direct {vd:.2f} s", f"{ratio:.3f}×")
        )
    if label_of:
        rows.append(("b", f"(ratios: {label_of})", "", "", ""))
    rows.append(("b", "CPU s (daemon, backend, client)", r["cpu"], f"direct {d['cpu']}", ""))
    # /health: the worst pair, not the median one.
    worst = max(runs, key=lambda run: _pct(run[3]["samples"], 0.99))
    pd, pr, floor = worst[2], worst[3], worst[4]
    for q, label in ((0.5, "p50"), (0.99, "p99")):
        rows.append(
            (
                "b",
                f"/health {label} under load",
                f"{1000 * _pct(pr['samples'], q):.1f} ms",
                f"backend's own {1000 * _pct(pd['samples'], q):.1f} ms",
                f"floor {1000 * _pct(floor['samples'], q):.1f} ms",
            )
        )
    return rows


def _pid_on_port(port: int) -> int:
    for conn in psutil.net_connections("tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
            return int(conn.pid or 0)
    return 0


class _CpuWatch:
    def __init__(self, pids: list[int]) -> None:
        self.processes = [psutil.Process(p) for p in pids if p]
        self.start = [p.cpu_times() for p in self.processes]

    def stop(self) -> None:
        self.end = [p.cpu_times() for p in self.processes]

    def summary(self) -> str:
        return ", ".join(
            f"{(e.user + e.system) - (s.user + s.system):.1f}"
            for s, e in zip(self.start, self.end, strict=True)
        )


def _print(rows: list[tuple[str, str, str, str, str]]) -> None:
    print(f"{'':2} {'figure':34} {'trioserve':>14} {'direct':>26} {'ratio':>9}")
    for row in rows:
        print(f"{row[0]:2} {row[1]:34} {row[2]:>14} {row[3]:>26} {row[4]:>9}")
    sys.stdout.flush()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
