"""``/health`` latency with TLS on the main port: over HTTPS on the main port (answered by the
app, the TLS handshake included, as an HTTPS probe does it) against the plain-HTTP
``health_port`` (answered at accept time), idle and under N open TLS streams; with the floor
(``_idle_health.py``, a process that does nothing else) probed in the same rotation.

Starts ``trioserve start`` with certificates made here (``trustme``), the load in its own
process (``_tls_streams.py``), probes from this one (blocking sockets, no event loop), one
probe of each kind in turn every ``--interval``. Under a minute with the defaults.

    .venv/bin/python bench/tls_health.py [--streams 200] [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
from _daemon import wait_healthy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.ports import free_port
from tests.support.tls import Certificates

ROOT = Path(__file__).resolve().parent.parent
TRIOSERVE = str(Path(sys.executable).parent / "trioserve")
# 50 chunks/s per stream (bench/load.py's "stream" model), long enough to outlast the run.
STREAM_MODEL = "--tokens 5000 --token-delay 0.02"
REQUEST = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def _raise_fd_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _config(state_dir: Path, port: int, health_port: int, certs: Certificates) -> str:
    echo = '"{python}", "-m", "trioserve.backends.echo", "--port", "{port}"'
    extra = ", ".join(f'"{o}"' for o in STREAM_MODEL.split())
    return "\n".join(
        [
            "[server]",
            f"port = {port}",
            f"health_port = {health_port}",
            f'state_dir = "{state_dir}"',
            f'tls_cert = "{certs.server_cert}"',
            f'tls_key = "{certs.server_key}"',
            "[supervisor]",
            "port_range = [23100, 23199]",
            "[models.stream]",
            f"cmd = [{echo}, {extra}]",
            "ttl = 0",
            "max_concurrency = 1100",
            "max_queue = 2000",
        ]
    )


def _exchange(conn: socket.socket) -> bool:
    conn.sendall(REQUEST)
    answer = b""
    while chunk := conn.recv(4096):
        answer += chunk
    return answer.startswith(b"HTTP/1.1 200 ")


def _plain(port: int) -> Callable[[], bool]:
    def probe() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            return _exchange(conn)

    return probe


def _https(port: int, context: ssl.SSLContext) -> Callable[[], bool]:
    def probe() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            # As curl, Go and HAProxy do: without it, the request waits for the ACK of the
            # client's last handshake message (Nagle), i.e. the server's delayed ACK (~40 ms).
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
                return _exchange(conn)

    return probe


def _probe(
    probes: dict[str, Callable[[], bool]], seconds: float, interval: float
) -> dict[str, list[float]]:
    """Each probe in turn, ``interval`` apart, for ``seconds``: each one's latencies (s)."""
    samples: dict[str, list[float]] = {name: [] for name in probes}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for name, probe in probes.items():
            start = time.perf_counter()
            try:
                ok = probe()
            except OSError:
                ok = False
            took = time.perf_counter() - start
            samples[name].append(took if ok else float("inf"))
            time.sleep(interval)
    return samples


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20, help="under load; idle: half")
    parser.add_argument("--interval", type=float, default=0.01)
    args = parser.parse_args()
    _raise_fd_limit()
    with tempfile.TemporaryDirectory() as tmp:
        certs = Certificates(Path(tmp) / "tls")
        client = certs.client_context()
        port, health_port, floor_port = free_port(), free_port(), free_port()
        state_dir = Path(tmp) / "state"
        state_dir.mkdir()
        conf = Path(tmp) / "bench.toml"
        conf.write_text(_config(state_dir, port, health_port, certs))
        daemon = subprocess.Popen(
            [TRIOSERVE, "start", "--config", str(conf), "--log-level", "warning"],
            preexec_fn=_raise_fd_limit,
        )
        floor = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "_idle_health.py"), str(floor_port)],
            stdout=subprocess.PIPE,
        )
        load: subprocess.Popen[str] | None = None
        try:
            assert floor.stdout is not None
            floor.stdout.readline()
            wait_healthy(f"http://127.0.0.1:{health_port}", daemon)
            # Loaded over the admin socket: no key needed there.
            transport = httpx.HTTPTransport(uds=str(state_dir / "admin.sock"))
            with httpx.Client(transport=transport, base_url="http://localhost", timeout=60) as c:
                c.post("/admin/models/stream/load").raise_for_status()
                backend = c.get("/admin/status").json()["models"]["stream"]["pid"]
            probes = {
                "main port, HTTPS (app)": _https(port, client),
                "health_port, HTTP (accept time)": _plain(health_port),
                "floor (_idle_health.py)": _plain(floor_port),
            }
            idle = _probe(probes, args.seconds / 2, args.interval)
            body = json.dumps(
                {"model": "stream", "stream": True, "messages": [{"role": "user", "content": "a"}]}
            )
            load = subprocess.Popen(
                [
                    sys.executable,
                    str(ROOT / "bench" / "_tls_streams.py"),
                    f"https://127.0.0.1:{port}/v1/chat/completions",
                    str(certs.ca_pem),
                    str(args.streams),
                    body,
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                preexec_fn=_raise_fd_limit,
            )
            assert load.stdout is not None and load.stdin is not None
            started = time.monotonic()
            if load.stdout.readline().strip() != "ready":
                raise SystemExit("the load did not start")
            ramp = time.monotonic() - started
            # CPU over the loaded probes: is the daemon, the load or the backend saturated?
            watched = {"daemon": daemon.pid, "load": load.pid, "backend": backend}
            cpu = {name: psutil.Process(pid) for name, pid in watched.items()}
            for process in cpu.values():
                process.cpu_percent()
            busy = _probe(probes, args.seconds, args.interval)
            used = {name: process.cpu_percent() for name, process in cpu.items()}
            load.stdin.close()
            stats = json.loads(load.stdout.readline())
            load.wait(30)
        finally:
            if load is not None and load.poll() is None:
                load.kill()
            floor.kill()
            floor.wait()
            daemon.terminate()
            daemon.wait(30)
    print(
        f"/health latency, ms (p50 / p99 / max); {args.streams} TLS streams at 50 chunks/s each "
        f"(all open after {ramp:.1f} s; {stats['chunks']} chunks, {stats['errors']} errors)"
    )
    print(f"{'probe':34} {'idle':>22} {f'{args.streams} open TLS streams':>26}")
    for name in probes:
        cells = []
        for samples in (idle[name], busy[name]):
            failed = sum(1 for s in samples if s == float("inf"))
            ms = [s * 1000 for s in samples if s != float("inf")]
            cell = f"{_pct(ms, 0.5):.1f} / {_pct(ms, 0.99):.1f} / {max(ms):.1f}"
            cells.append(cell + (f" ({failed} failed)" if failed else ""))
        print(f"{name:34} {cells[0]:>22} {cells[1]:>26}   n={len(busy[name])}")
    print("CPU under load: " + ", ".join(f"{name} {share:.0f} %" for name, share in used.items()))


if __name__ == "__main__":
    main()
