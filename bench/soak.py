"""Soak: minutes of mixed traffic against a real daemon, then what was answered and what leaked.

Starts the daemon (the installed console script) as a subprocess with four echo models, and
drives it from this process: streams read to the end, streams the client hangs up on (FIN or
reset), non-streaming chats and embeddings, a model slower than ``first_byte_timeout`` (504),
clients that give up early, unknown models (404), a model that crashes mid-stream, and an
operator that loads and unloads models (some with ``force``) now and then; ``max_loaded`` and
short TTLs add evictions and expiries. A thread samples the daemon meanwhile: its fds and RSS,
and the process groups of its models (never two for one model).

At the end it prints: requests answered (%), 500s, hangs, answers cut short, the process
groups seen per model, processes with the instance's marker left after the daemon stopped,
and the daemon's fds and RSS at the start and at the end (both idle, no model loaded), and
its fds once more after Hypercorn's keep-alive timeout, when sockets that clients left behind
after a stream (CLOSE_WAIT) are gone, and one more relayed request has let the connection pool
drop idle connections to models stopped meanwhile.

    .venv/bin/python bench/soak.py                 # 10 minutes
    .venv/bin/python bench/soak.py --seconds 60    # a quick run
    .venv/bin/python bench/soak.py --no-faults     # no force unloads, no crashing model

Exit status 1 when a 500, a hang, a badly shaped answer, a leaked process or fd, two processes
of one model, or the daemon's death were seen.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import trio
from _daemon import wait_healthy

from trioserve.server.hypercorn_serve import KEEP_ALIVE_TIMEOUT

# A free port as the tests take one, and their way in as admin: the helpers are shared.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.admin import AdminAuth
from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
TRIOSERVE = str(Path(sys.executable).parent / "trioserve")
CHAT = "/v1/chat/completions"
# The slow model answers after this long, past first_byte_timeout: a 504 every time.
SLOW_DELAY = 3.0
FIRST_BYTE_TIMEOUT = 1.5
# Every request is given this long before it counts as hung.
HANG_AFTER = 60.0


def _config(state_dir: str, port: int, faults: bool, ports: int) -> str:
    echo = '"{python}", "-m", "trioserve.backends.echo", "--port", "{port}"'
    models: dict[str, tuple[str, str]] = {
        # name: (echo options, extra TOML lines)
        "chat": ("--tokens 40 --token-delay 0.02", "ttl = 20\nmax_concurrency = 16"),
        "tiny": ("--tokens 2", 'ttl = 2\nmax_concurrency = 16\naliases = ["small"]'),
        "slow": (f"--response-delay {SLOW_DELAY} --tokens 3", "ttl = 10\nmax_concurrency = 32"),
    }
    if faults:
        models["flaky"] = ("--tokens 10 --token-delay 0.01 --crash-after 4", "ttl = 10")
    lines = [
        "[server]",
        'host = "127.0.0.1"',
        f"port = {port}",
        f'state_dir = "{state_dir}"',
        f"first_byte_timeout = {FIRST_BYTE_TIMEOUT}",
        "request_timeout = 30",
        "stream_idle_timeout = 10",
        "[supervisor]",
        "max_loaded = 3",
        "stop_grace = 3",
        "start_timeout = 30",
        "failure_cooldown = 2",
        # Below the ephemeral range (32768-60999), so no client socket takes a model's port.
        f"port_range = [21000, {21000 + ports - 1}]",
    ]
    for name, (options, extra) in models.items():
        argv = ", ".join(f'"{o}"' for o in options.split())
        lines += [f"[models.{name}]", f"cmd = [{echo}, {argv}]", "max_queue = 256", extra]
    return "\n".join(lines) + "\n"


def _marked(instance: str, root: int | None = None) -> dict[str, set[int]]:
    """Live processes with ``TRIOSERVE_INSTANCE=instance``: {model: {pgid}}; descendants of
    ``root`` only, or the whole process table."""
    if root is not None:
        try:
            procs = psutil.Process(root).children(recursive=True)
        except psutil.NoSuchProcess:
            return {}
    else:
        procs = list(psutil.process_iter())
    found: dict[str, set[int]] = {}
    for proc in procs:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            env = proc.environ()
            if env.get("TRIOSERVE_INSTANCE") != instance:
                continue
            found.setdefault(env.get("TRIOSERVE_MODEL", "?"), set()).add(os.getpgid(proc.pid))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


@dataclass(eq=False)
class Sampler(threading.Thread):
    """Samples the daemon from a thread: fds, RSS, its models' process groups."""

    pid: int
    instance: str
    every: float = 0.25
    samples: int = 0
    most_groups: Counter[str] = field(default_factory=Counter)
    two_at_once: list[tuple[float, str, list[int]]] = field(default_factory=list)
    peak_fds: int = 0
    peak_rss: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        super().__init__(daemon=True)

    def run(self) -> None:
        daemon = psutil.Process(self.pid)
        while not self.stop.is_set():
            try:
                self.peak_fds = max(self.peak_fds, daemon.num_fds())
                self.peak_rss = max(self.peak_rss, daemon.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            for model, groups in _marked(self.instance, self.pid).items():
                self.most_groups[model] = max(self.most_groups[model], len(groups))
                if len(groups) > 1:
                    self.two_at_once.append((time.monotonic(), model, sorted(groups)))
            self.samples += 1
            self.stop.wait(self.every)


@dataclass
class Tally:
    sent: Counter[str] = field(default_factory=Counter)  # scenario -> requests
    statuses: Counter[int] = field(default_factory=Counter)
    by_scenario: dict[str, Counter[str]] = field(default_factory=dict)
    answered: int = 0
    abandoned: int = 0  # clients that gave up on purpose
    broken: list[str] = field(default_factory=list)  # connection cut before a whole answer
    hung: list[str] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)  # 500s, wrong shapes, streams without an end
    reasons: Counter[str] = field(default_factory=Counter)  # "status: message" of 5xx answers
    examples: dict[str, str] = field(default_factory=dict)  # the first full message of each

    def record(self, scenario: str, outcome: str) -> None:
        self.by_scenario.setdefault(scenario, Counter())[outcome] += 1


def _kind(message: str) -> str:
    """The first words of an error message, without quoted names, numbers and output."""
    words = []
    for word in message.split(";")[0].split(":")[0].split():
        if word.startswith("'") or any(ch.isdigit() for ch in word):
            word = "…"
        words.append(word)
    return " ".join(words)[:90]


def _error_ok(body: bytes) -> bool:
    try:
        error = json.loads(body)["error"]
        return {"message", "type", "code"} <= set(error)
    except (ValueError, KeyError, TypeError):
        return False


class Traffic:
    def __init__(
        self, url: str, admin: AdminAuth, tally: Tally, faults: bool, rng: random.Random
    ) -> None:
        self.url = url
        self.admin = admin
        self.host, port = url.removeprefix("http://").rsplit(":", 1)
        self.port = int(port)
        self.tally = tally
        self.faults = faults
        self.rng = rng
        self.models = ["chat", "tiny", "small", "slow"] + (["flaky"] if faults else [])
        self.died_after: float | None = None

    def _body(self, model: str, stream: bool, **extra: Any) -> dict[str, Any]:
        text = " ".join(self.rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(4))
        return {
            "model": model,
            "stream": stream,
            "messages": [{"role": "user", "content": text}],
            **extra,
        }

    def _status(self, scenario: str, status: int, body: bytes) -> None:
        tally = self.tally
        tally.statuses[status] += 1
        tally.record(scenario, str(status))
        tally.answered += 1
        if status >= 500:
            try:
                message = str(json.loads(body)["error"]["message"])
            except (ValueError, KeyError, TypeError):
                message = body[:80].decode(errors="replace")
            # Names and numbers vary; the kind of reason is what is worth counting.
            kind = f"{status}: {_kind(message)}"
            tally.reasons[kind] += 1
            tally.examples.setdefault(kind, message[:400])
        if status >= 500 and status not in (502, 503, 504):
            tally.bad.append(f"{scenario}: {status} {body[:200]!r}")
        elif status >= 400 and not _error_ok(body):
            tally.bad.append(f"{scenario}: {status} not OpenAI-shaped: {body[:200]!r}")

    async def stream(self, http: httpx.AsyncClient, scenario: str, model: str) -> None:
        async with http.stream("POST", CHAT, json=self._body(model, True)) as response:
            body = await response.aread()
        if response.status_code == 200:
            events = [
                line
                for line in body.decode(errors="replace").splitlines()
                if line.startswith("data: ")
            ]
            last = events[-1].removeprefix("data: ") if events else ""
            if last != "[DONE]" and not _error_ok(last.encode()):
                self.tally.bad.append(f"{scenario}: stream without an end: {body[-200:]!r}")
        self._status(scenario, response.status_code, body)

    async def plain(self, http: httpx.AsyncClient, scenario: str, model: str) -> None:
        response = await http.post(CHAT, json=self._body(model, False))
        self._status(scenario, response.status_code, response.content)

    async def embeddings(self, http: httpx.AsyncClient, scenario: str) -> None:
        response = await http.post("/v1/embeddings", json={"model": "tiny", "input": "soak"})
        self._status(scenario, response.status_code, response.content)

    async def hang_up(self, scenario: str, model: str, reset: bool) -> None:
        body = json.dumps(self._body(model, True)).encode()
        sock = trio.socket.socket()
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await sock.connect((self.host, self.port))
        async with trio.SocketStream(sock) as stream:
            await stream.send_all(
                f"POST {CHAT} HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            seen = b""
            while b"\r\n\r\n" not in seen or (
                seen.startswith(b"HTTP/1.1 200") and b"data: " not in seen
            ):
                data = await stream.receive_some(65536)
                if not data:
                    break
                seen += data
        status = int(seen.split(b" ", 2)[1]) if seen.startswith(b"HTTP/1.1 ") else 0
        if status == 0:
            self.tally.broken.append(f"{scenario}: closed before a head")
            self.tally.record(scenario, "broken")
            return
        # A stream we left on purpose after its first event: answered as far as we asked.
        self.tally.statuses[status] += 1
        self.tally.record(scenario, str(status))
        self.tally.answered += 1

    async def give_up(self, http: httpx.AsyncClient, scenario: str) -> None:
        try:
            await http.post(CHAT, json=self._body("slow", False), timeout=0.3)
        except httpx.TimeoutException:
            self.tally.abandoned += 1
            self.tally.record(scenario, "gave up")
            return
        self.tally.record(scenario, "answered before giving up")
        self.tally.answered += 1

    async def one(self, http: httpx.AsyncClient) -> None:
        roll = self.rng.random()
        model = self.rng.choice(["chat", "chat", "tiny", "small"])
        if roll < 0.30:
            scenario, call = "stream", self.stream(http, "stream", model)
        elif roll < 0.45:
            scenario, call = "chat", self.plain(http, "chat", model)
        elif roll < 0.60:
            reset = self.rng.random() < 0.5
            scenario = "hang-up (reset)" if reset else "hang-up"
            call = self.hang_up(scenario, "chat", reset)
        elif roll < 0.68:
            scenario, call = "deadline (504)", self.plain(http, "deadline (504)", "slow")
        elif roll < 0.72:
            scenario, call = "client gives up", self.give_up(http, "client gives up")
        elif roll < 0.80:
            name = self.rng.choice(["nope", "../chat", "chat ", "x" * 300])
            scenario, call = "unknown model", self.plain(http, "unknown model", name)
        elif roll < 0.88:
            scenario, call = "embeddings", self.embeddings(http, "embeddings")
        elif self.faults and roll < 0.95:
            scenario, call = "crashing model", self.stream(http, "crashing model", "flaky")
        else:
            scenario, call = "stream", self.stream(http, "stream", "tiny")
        self.tally.sent[scenario] += 1
        with trio.move_on_after(HANG_AFTER) as guard:
            try:
                await call
            except (httpx.RemoteProtocolError, httpx.ReadError, trio.BrokenResourceError) as exc:
                self.tally.broken.append(f"{scenario}: {exc!r}"[:300])
                self.tally.record(scenario, "broken")
            except (httpx.ConnectError, OSError) as exc:
                self.tally.broken.append(f"{scenario}: cannot connect: {exc!r}"[:300])
                self.tally.record(scenario, "cannot connect")
        if guard.cancelled_caught:
            self.tally.hung.append(scenario)
            self.tally.record(scenario, "hung")

    async def operator(self, http: httpx.AsyncClient, until: float) -> None:
        while trio.current_time() < until:
            await trio.sleep(self.rng.uniform(1.0, 3.0))
            name = self.rng.choice(["chat", "tiny", "slow"] + (["flaky"] if self.faults else []))
            action = self.rng.choice(
                ["load", "unload", "unload-force" if self.faults else "unload"]
            )
            params = {"force": "true"} if action == "unload-force" else {}
            path = f"/admin/models/{name}/{action.split('-')[0]}"
            scenario = f"admin {action}"
            self.tally.sent[scenario] += 1
            with trio.move_on_after(HANG_AFTER) as guard:
                try:
                    response = await http.post(path, params=params, auth=self.admin)
                    self._status(scenario, response.status_code, response.content)
                except httpx.HTTPError as exc:
                    self.tally.broken.append(f"{scenario}: {exc!r}"[:300])
                    self.tally.record(scenario, "broken")
            if guard.cancelled_caught:
                self.tally.hung.append(scenario)

    async def run(self, seconds: float, workers: int, daemon: subprocess.Popen[bytes]) -> None:
        until = trio.current_time() + seconds
        limits = httpx.Limits(max_connections=workers + 8, max_keepalive_connections=workers + 8)
        async with httpx.AsyncClient(
            base_url=self.url, timeout=HANG_AFTER, limits=limits, trust_env=False
        ) as http:

            async def worker() -> None:
                while trio.current_time() < until and daemon.poll() is None:
                    await self.one(http)

            async def watch_daemon() -> None:
                # A dead daemon ends the run: the rest would only be refused connections.
                while daemon.poll() is None:
                    await trio.sleep(0.2)
                self.died_after = trio.current_time() - (until - seconds)
                nursery.cancel_scope.cancel()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_daemon)
                async with trio.open_nursery() as traffic:
                    traffic.start_soon(self.operator, http, until)
                    for _ in range(workers):
                        traffic.start_soon(worker)
                nursery.cancel_scope.cancel()


def _idle(url: str, admin: AdminAuth, instance: str, pid: int) -> None:
    """Unload every model and wait until no model process is left: the state the start
    figures were taken in."""
    with httpx.Client(base_url=url, timeout=60, trust_env=False, auth=admin) as client:
        for name in client.get("/admin/status").json()["models"]:
            client.post(f"/admin/models/{name}/unload")
    deadline = time.monotonic() + 30
    while _marked(instance, pid) and time.monotonic() < deadline:
        time.sleep(0.1)


def _settle(pid: int, port: int) -> None:
    """Wait (at most the keep-alive timeout and a margin) until no socket of a client that
    left is still open: they linger in CLOSE_WAIT until Hypercorn's keep-alive timer."""
    deadline = time.monotonic() + KEEP_ALIVE_TIMEOUT + 5
    while time.monotonic() < deadline and any(
        kind.startswith("from clients") for kind in _sockets(pid, port)
    ):
        time.sleep(0.25)


def _purge_pool(url: str, admin: AdminAuth, instance: str, pid: int) -> None:
    headers = {"connection": "close"}
    with httpx.Client(base_url=url, timeout=60, trust_env=False, headers=headers) as client:
        client.post(CHAT, json={"model": "tiny", "messages": [{"role": "user", "content": "x"}]})
    _idle(url, admin, instance, pid)


def _figures(pid: int) -> tuple[int, int]:
    daemon = psutil.Process(pid)
    return daemon.num_fds(), daemon.memory_info().rss


def _sockets(pid: int, port: int) -> dict[str, int]:
    """The daemon's TCP sockets by kind: listening, from clients, to models (by state)."""
    kinds: Counter[str] = Counter()
    for conn in psutil.Process(pid).net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN:
            kinds["listening"] += 1
        elif conn.laddr and conn.laddr.port == port:
            kinds[f"from clients ({conn.status})"] += 1
        else:
            kinds[f"to models ({conn.status})"] += 1
    return dict(kinds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, help="overrides --minutes, for quick runs")
    parser.add_argument("--workers", type=int, default=24)
    parser.add_argument("--no-faults", action="store_true", help="no force unloads, no crashes")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--ports", type=int, default=1000, help="size of port_range (1000, as the default config)"
    )
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    parser.add_argument("--verbose", action="store_true", help="an example of each 5xx reason")
    args = parser.parse_args()
    seconds = args.seconds if args.seconds is not None else args.minutes * 60
    faults = not args.no_faults
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="trioserve-soak-") as tmp:
        conf = Path(tmp) / "soak.toml"
        conf.write_text(_config(str(Path(tmp) / "state"), port, faults, args.ports))
        admin = AdminAuth(Path(tmp) / "state")
        log = Path(tmp) / "daemon.log"
        with open(log, "wb") as err:
            daemon = subprocess.Popen(
                [TRIOSERVE, "start", "--config", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
            )
        try:
            wait_healthy(url, daemon)
            instance = httpx.get(url + "/admin/status", trust_env=False).json()["instance"]
            start_fds, start_rss = _figures(daemon.pid)
            sampler = Sampler(daemon.pid, instance)
            sampler.start()
            tally = Tally()
            began = time.monotonic()
            traffic = Traffic(url, admin, tally, faults, random.Random(args.seed))
            trio.run(
                traffic.run,
                seconds,
                args.workers,
                daemon,
            )
            ran = time.monotonic() - began
            died = daemon.poll()
            if died is None:
                _idle(url, admin, instance, daemon.pid)
                end_fds, end_rss = _figures(daemon.pid)
                end_sockets = _sockets(daemon.pid, port)
                # Sockets of clients that left a keep-alive connection linger in CLOSE_WAIT
                # until Hypercorn's keep_alive_timeout: wait that out, so that what is left
                # after it is what really leaked.
                _settle(daemon.pid, port)
                # Idle pooled connections to models stopped since hold their fds (CLOSE_WAIT)
                # until the pool is used again: one relayed request purges them.
                _purge_pool(url, admin, instance, daemon.pid)
                _settle(daemon.pid, port)
                settled_fds, _ = _figures(daemon.pid)
                settled_sockets = _sockets(daemon.pid, port)
            else:
                end_fds = end_rss = settled_fds = 0
                end_sockets = settled_sockets = {}
            sampler.stop.set()
            sampler.join()
        finally:
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                try:
                    daemon.wait(60)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait()
        code = daemon.returncode
        # The instance's marker anywhere in the process table, once the daemon is gone.
        deadline = time.monotonic() + 5
        while (leaked := _marked(instance)) and time.monotonic() < deadline:
            time.sleep(0.1)
        daemon_log = log.read_text(errors="replace")

    sent = sum(tally.sent.values())
    expected = sent - tally.abandoned
    answered_pct = 100.0 * tally.answered / expected if expected else 0.0
    fives = tally.statuses.get(500, 0)
    leaked_count = sum(len(groups) for groups in leaked.values())
    asgi_errors = daemon_log.count("Error in ASGI Framework")
    figures = {
        "seconds": round(ran, 1),
        "workers": args.workers,
        "faults": faults,
        "requests": sent,
        "answered": tally.answered,
        "answered_pct": round(answered_pct, 3),
        "abandoned_by_client": tally.abandoned,
        "broken": len(tally.broken),
        "hung": len(tally.hung),
        "bad": len(tally.bad),
        "status_500": fives,
        "statuses": dict(sorted(tally.statuses.items())),
        "max_process_groups_per_model": dict(sampler.most_groups),
        "two_processes_for_one_model": len(sampler.two_at_once),
        "samples": sampler.samples,
        "leaked_processes": leaked_count,
        "daemon_exit_code": code,
        "daemon_died_during_run": died is not None,
        "daemon_died_after_s": traffic.died_after,
        "asgi_errors_logged": asgi_errors,
        "fds_start": start_fds,
        "fds_end": end_fds,
        "fds_peak": sampler.peak_fds,
        "sockets_end": end_sockets,
        "fds_settled": settled_fds,
        "sockets_settled": settled_sockets,
        "rss_start_mib": round(start_rss / 2**20, 1),
        "rss_end_mib": round(end_rss / 2**20, 1),
        "rss_peak_mib": round(sampler.peak_rss / 2**20, 1),
    }
    print(f"soak: {ran:.0f} s, {args.workers} workers, faults {'on' if faults else 'off'}")
    print(
        f"requests: {sent} sent, {tally.answered} answered of {expected} expecting an answer "
        f"({answered_pct:.2f}%), {tally.abandoned} abandoned by their client on purpose"
    )
    print(f"  cut short: {len(tally.broken)}, hung: {len(tally.hung)}, bad: {len(tally.bad)}")
    print(f"  statuses: {figures['statuses']}")
    for scenario, outcomes in sorted(tally.by_scenario.items()):
        print(f"    {scenario:<22} {dict(sorted(outcomes.items()))}")
    print("  5xx reasons:")
    for reason, count in tally.reasons.most_common(8):
        print(f"    {count:>6}  {reason}")
        if args.verbose:
            print(f"            e.g. {tally.examples[reason]!r}")
    print(f"500s: {fives}")
    print(
        f"process groups per model, most at once: {dict(sampler.most_groups)} "
        f"({sampler.samples} samples; two at once: {len(sampler.two_at_once)})"
    )
    print(f"leaked processes after stop: {leaked_count}  {leaked or ''}")
    print(
        f"daemon fds: start {start_fds}, end {end_fds} (peak {sampler.peak_fds}), "
        f"{settled_fds} once the keep-alive timeout passed"
    )
    print(f"  its sockets at the end: {end_sockets}; after the timeout: {settled_sockets}")
    print(
        f"daemon RSS: start {figures['rss_start_mib']} MiB, end {figures['rss_end_mib']} MiB "
        f"(peak {figures['rss_peak_mib']} MiB)"
    )
    print(
        f"daemon: exit code {code}"
        + (
            f" (it died {traffic.died_after:.1f} s into the run)"
            if traffic.died_after is not None
            else ""
        )
        + f", 'Error in ASGI Framework' logged {asgi_errors} times"
    )
    if died is not None:
        print("  the end of its log:")
        for line in daemon_log.splitlines()[-40:]:
            print(f"    {line}")
    for line in (tally.bad + tally.broken + tally.hung)[:10]:
        print(f"  e.g. {line}")
    if args.json:
        print(json.dumps(figures))
    failed = (
        fives
        or (died is None and settled_fds > start_fds + 2)
        or tally.hung
        or tally.bad
        or leaked_count
        or sampler.two_at_once
        or died is not None
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
