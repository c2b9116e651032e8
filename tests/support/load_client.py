"""A deliberately light HTTP/1.1 load client (asyncio + raw sockets), run as its own process
(by path: it imports nothing of the project). The benchmarks run it, and the tests run its probe.

The load must not be the bottleneck, and must be the same for the direct and the relayed case,
so the ratio between them is about trioserve alone. It speaks just enough HTTP: one request per
connection (``Connection: close``), response read to EOF, chunk boundaries of SSE counted by
``data:`` lines.

Usage (prints one JSON object), ``CLIENT`` being ``python tests/support/load_client.py``:
    CLIENT --url http://127.0.0.1:PORT/v1/chat/completions \
        --concurrency 100 --requests 1000 --body '{"model": ...}' [--stream]
    CLIENT --url DIRECT --url2 RELAYED --requests 1000 --body ...  # paired
    CLIENT --probe http://127.0.0.1:PORT/health --seconds 10 --interval 0.01

``LOAD_CLIENT_HEADER="Name: value"`` in the environment adds that header to every request (a
user's key, for a daemon that needs one).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from urllib.parse import urlsplit

_EXTRA_HEADER = os.environ.get("LOAD_CLIENT_HEADER", "")
_EXTRA_LINE = f"{_EXTRA_HEADER}\r\n" if _EXTRA_HEADER else ""


async def _request(host: str, port: int, path: str, body: bytes) -> tuple[float, float, int, int]:
    """Returns (ttfb, total, data events, status)."""
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"{_EXTRA_LINE}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    writer.write(head + body)
    await writer.drain()
    first = await reader.read(65536)
    ttfb = time.perf_counter() - start
    status = int(first.split(b" ", 2)[1]) if first.startswith(b"HTTP/") else 0
    events = first.count(b"data: ")
    tail = first[-8:]
    while True:
        data = await reader.read(65536)
        if not data:
            break
        # An SSE marker split across reads is counted via the carried tail.
        events += (tail + data).count(b"data: ") - tail.count(b"data: ")
        tail = data[-8:]
    writer.close()
    return ttfb, time.perf_counter() - start, events, status


async def _load(args: argparse.Namespace) -> dict[str, object]:
    parts = urlsplit(args.url)
    host, port, path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path
    body = args.body.encode()
    results: list[tuple[float, float, int, int]] = []
    errors: list[str] = []
    remaining = args.requests
    sem_start = time.perf_counter()

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            try:
                results.append(
                    await asyncio.wait_for(_request(host, port, path, body), args.timeout)
                )
            except Exception as exc:  # counted, not raised
                errors.append(type(exc).__name__)

    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    wall = time.perf_counter() - sem_start
    ok = [r for r in results if r[3] == 200]
    return {
        "wall_s": wall,
        "completed": len(ok),
        "requests": args.requests,
        "errors": errors[:5],
        "statuses": sorted({r[3] for r in results}),
        "latencies": [r[1] for r in ok],
        "ttfb": [r[0] for r in ok],
        "events": sum(r[2] for r in ok),
        "client_cpu_s": time.process_time(),
    }


async def _paired(args: argparse.Namespace) -> dict[str, object]:
    """Sequential requests alternating between --url and --url2: both see the same machine
    at the same moments, so their difference is not drift between two runs."""
    body = args.body.encode()
    targets = []
    for url in (args.url, args.url2):
        parts = urlsplit(url)
        targets.append((parts.hostname or "127.0.0.1", parts.port or 80, parts.path))
    latencies: list[list[float]] = [[], []]
    for _ in range(args.requests):
        for i, (host, port, path) in enumerate(targets):
            _, total, _, status = await _request(host, port, path, body)
            if status == 200:
                latencies[i].append(total)
    return {
        "latencies": latencies[0],
        "latencies2": latencies[1],
        "requests": args.requests,
        "client_cpu_s": time.process_time(),
    }


async def _probe(args: argparse.Namespace) -> dict[str, object]:
    parts = urlsplit(args.probe)
    host, port, path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path
    samples: list[float] = []
    offsets: list[float] = []
    failures = 0
    began = time.perf_counter()
    end = began + args.seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        try:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            data = await reader.read()
            writer.close()
            if b" 200 " not in data.split(b"\r\n", 1)[0]:
                failures += 1
            samples.append(time.perf_counter() - start)
            offsets.append(start - began)
        except OSError:
            failures += 1
        await asyncio.sleep(args.interval)
    return {"samples": samples, "offsets": offsets, "failures": failures}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url")
    parser.add_argument("--url2", help="alternate sequential requests with --url (paired)")
    parser.add_argument("--probe")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--requests", type=int, default=1)
    parser.add_argument("--body", default="{}")
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--interval", type=float, default=0.01)
    args = parser.parse_args()
    if args.probe:
        result = asyncio.run(_probe(args))
    elif args.url2:
        result = asyncio.run(_paired(args))
    else:
        result = asyncio.run(_load(args))
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
