"""A finished request leaves no reference cycles behind: everything it made is freed by reference
counting at once. Cycles wait for the garbage collector, whose passes hold the GIL, and with it
the /health thread, for tens of milliseconds with 1,000 streams open (bench/load.py b)."""

from __future__ import annotations

import gc
import json
import socket
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.conftest import echo_cmd, make_config, running_daemon
from tests.gateway_helpers import chat


def _exchange(url: str, body: dict[str, Any]) -> bytes:
    """One request on its own connection, in a plain thread: the client makes no garbage in
    this process's collector either."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\n"
            + f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


@contextmanager
def _garbage_collected() -> Iterator[Counter[str]]:
    """What the collector finds (by type) among what was made inside the block."""
    found: Counter[str] = Counter()
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield found
        gc.collect()
        found.update(type(o).__name__ for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("non-streaming", chat()),
        ("streaming", chat(stream=True)),
        ("unknown model (404)", chat("nosuch")),
    ],
)
async def test_a_finished_request_leaves_no_garbage_for_the_collector(
    state_dir: Path, name: str, body: dict[str, Any]
) -> None:
    config = make_config(state_dir, {"echo": {"cmd": echo_cmd("--tokens", "5")}})
    async with running_daemon(config) as (info, client):
        await client.post("/admin/models/echo/load")
        for _ in range(5):  # warm up: pools, caches, lazily made objects
            await trio.to_thread.run_sync(_exchange, info.url, body)
        with _garbage_collected() as garbage:
            for _ in range(20):
                answer = await trio.to_thread.run_sync(_exchange, info.url, body)
                assert answer.startswith(b"HTTP/1.1 "), answer[:100]
            # The daemon's side of each connection ends just after the client's.
            await trio.sleep(0.2)
        assert not garbage, f"{name}: {garbage.most_common(10)}"
