"""The relay's upstream pool against a real echo backend: keep-alive reuse, a response abandoned
half-way closes its connection (the backend sees the disconnect), connections a backend closed
are never reused, and every connection is closed on shutdown, even a cancelled one."""

from __future__ import annotations

import socket
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.conftest import echo_cmd, make_config, running_daemon
from tests.gateway_helpers import model_server_cmd
from tests.test_echo_backend import chat, echo_backend, free_port, stop
from trioserve.gateway.upstream import KeepAlivePool, upstream_client


def _local_port(response: httpx.Response) -> int:
    sock: socket.socket = response.extensions["network_stream"].get_extra_info("socket")
    port: int = sock.getsockname()[1]
    return port


async def _post(http: httpx.AsyncClient, url: str, body: dict[str, Any]) -> tuple[int, int]:
    """(status, local port of the connection used)."""
    async with http.stream("POST", url, json=body) as response:
        port = _local_port(response)  # while the connection is still ours
        await response.aread()
    return response.status_code, port


async def test_sequential_requests_reuse_one_connection() -> None:
    pool = KeepAlivePool(max_idle_per_backend=4, keepalive_expiry=5)
    async with echo_backend() as echo, upstream_client(pool) as http:
        url = str(echo.client.base_url).rstrip("/") + "/v1/chat/completions"
        used = [await _post(http, url, chat("hi")) for _ in range(5)]
        assert [status for status, _ in used] == [200] * 5
        assert len({port for _, port in used}) == 1, used
        assert pool.idle_count == 1


async def test_concurrent_requests_keep_at_most_the_idle_limit() -> None:
    pool = KeepAlivePool(max_idle_per_backend=2, keepalive_expiry=5)
    async with echo_backend("--response-delay", "0.2") as echo, upstream_client(pool) as http:
        url = str(echo.client.base_url).rstrip("/") + "/v1/chat/completions"
        ports: list[int] = []

        async def one() -> None:
            status, port = await _post(http, url, chat("hi"))
            assert status == 200
            ports.append(port)

        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(one)
        # Six at once need six connections; only two stay open afterwards.
        assert len(set(ports)) == 6
        assert pool.idle_count == 2


async def test_abandoned_stream_closes_its_connection_and_the_backend_stops() -> None:
    pool = KeepAlivePool(max_idle_per_backend=4, keepalive_expiry=5)
    async with (
        echo_backend("--tokens", "1000", "--token-delay", "0.01") as echo,
        upstream_client(pool) as http,
    ):
        url = str(echo.client.base_url).rstrip("/") + "/v1/chat/completions"
        async with http.stream("POST", url, json=chat("hi", stream=True)) as response:
            async for _ in response.aiter_raw():
                break  # one chunk, then walk away
        assert pool.idle_count == 0
        stats = await echo.wait_stats("cancelled", 1)
        assert stats["cancelled"] == 1


async def test_connection_closed_by_the_backend_while_idle_is_not_reused() -> None:
    pool = KeepAlivePool(max_idle_per_backend=4, keepalive_expiry=60)
    async with upstream_client(pool) as http:
        async with echo_backend() as echo:
            url = str(echo.client.base_url).rstrip("/") + "/v1/chat/completions"
            assert (await _post(http, url, chat("hi")))[0] == 200
            assert pool.idle_count == 1
        # The backend is gone (its side of the idle connection closed): the sweep finds it.
        await pool.sweep()
        assert pool.idle_count == 0


# Answers each request with "keep-alive", then closes the connection anyway: llama-server does
# this after every stream.
CLOSING_SERVER = """
import socket, sys
server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
print("ready", flush=True)
while True:
    conn, _ = server.accept()
    data = b""
    while b"\\r\\n\\r\\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\\r\\n\\r\\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\\r\\n")[0])
    while len(body) < length:
        body += conn.recv(65536)
    conn.sendall(b"HTTP/1.1 200 OK\\r\\ncontent-length: 2\\r\\n"
                 b"connection: keep-alive\\r\\n\\r\\n{}")
    conn.close()
"""


async def test_a_connection_the_backend_closed_after_answering_is_not_reused() -> None:
    port = free_port()
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", CLOSING_SERVER, str(port)], stdout=subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        await process.stdout.receive_some()  # "ready"
        pool = KeepAlivePool(max_idle_per_backend=4, keepalive_expiry=60)
        async with upstream_client(pool) as http:
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            used = [await _post(http, url, chat("hi")) for _ in range(3)]
        # No request failed on the dead connection: each found it closed and opened a new one.
        assert [status for status, _ in used] == [200] * 3
        assert len({port for _, port in used}) == 3
    finally:
        with trio.CancelScope(shield=True):
            await stop(process)


async def test_closing_the_pool_while_cancelled_still_closes_every_connection() -> None:
    pool = KeepAlivePool(max_idle_per_backend=8, keepalive_expiry=60)
    async with echo_backend("--response-delay", "0.1") as echo:
        http = upstream_client(pool)
        url = str(echo.client.base_url).rstrip("/") + "/v1/chat/completions"
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(partial(http.post, url, json=chat("hi")))
        connections = [c for conns in pool._idle.values() for c in conns]
        assert len(connections) == 4
        with trio.CancelScope() as scope:
            scope.cancel()
            await http.aclose()
        assert all(c.is_closed() for c in connections)
        assert pool.idle_count == 0


async def test_a_failing_sweep_is_logged_and_the_daemon_keeps_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken_sweep(self: KeepAlivePool) -> None:
        raise OSError("sweep broke")

    monkeypatch.setattr(KeepAlivePool, "sweep", broken_sweep)
    state_dir = tmp_path / "state"
    config = make_config(state_dir, {"echo": {"cmd": echo_cmd()}})
    async with running_daemon(config) as (_info, client):
        # Loading publishes lifecycle events, each of which runs a sweep.
        assert (await client.post("/admin/models/echo/load")).status_code == 200
        response = await client.post("/v1/chat/completions", json=chat("hi"))
        assert response.status_code == 200
    assert "closing idle upstream connections failed" in caplog.text


# Shows each request's head in its answer, and sets a cookie each time.
SHOW_HEAD_SET_COOKIE = """
answer = json.dumps({"headers": dict(self.headers.items())}).encode()
self.send_response(200)
self.send_header("content-type", "application/json")
self.send_header("content-length", str(len(answer)))
self.send_header("set-cookie", "session=user-a; Path=/")
self.end_headers()
self.wfile.write(answer)
"""


async def test_upstream_requests_carry_no_cookies_and_ask_for_no_compression(
    state_dir: Path,
) -> None:
    config = make_config(state_dir, {"m": {"cmd": model_server_cmd(SHOW_HEAD_SET_COOKIE)}})
    async with running_daemon(config) as (_info, client):
        seen = []
        for user in ("a", "b"):
            response = await client.post(
                "/v1/chat/completions", json=chat(f"from {user}", model="m")
            )
            assert response.status_code == 200, response.text
            seen.append({k.lower(): v for k, v in response.json()["headers"].items()})
    # User a's answer set a cookie: user b's request must not carry it.
    assert "cookie" not in seen[1], seen[1]
    # Bodies are relayed as they come: a gzip answer would lose its Content-Encoding.
    assert all("gzip" not in h.get("accept-encoding", "") for h in seen), seen
    assert seen[0]["content-type"] == "application/json"
