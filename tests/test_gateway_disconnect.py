"""A client that hangs up frees the model at once: the upstream request is cancelled within
100 ms, and a request waiting in the queue leaves it."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import trio

from tests.conftest import echo_cmd, make_config, running_daemon
from tests.gateway_helpers import backend_port, backend_stats, chat, wait_for_stats, wait_for_status


def _raw_request(url: str, body: bytes) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return sock


async def _hang_up_after(sock: socket.socket, marker: bytes) -> None:
    """Read until ``marker`` shows up, then close the connection."""
    sock.setblocking(False)
    seen = b""
    with trio.fail_after(10):
        while marker not in seen:
            await trio.lowlevel.wait_readable(sock)
            seen += sock.recv(65536)
    sock.close()


async def test_disconnect_mid_stream_cancels_upstream_within_100ms(state_dir: Path) -> None:
    config = make_config(
        state_dir, {"echo": {"cmd": echo_cmd("--tokens", "200", "--token-delay", "0.05")}}
    )
    async with running_daemon(config) as (info, client):
        await client.post("/admin/models/echo/load")
        port = await backend_port(client, "echo")
        sock = _raw_request(info.url, json.dumps(chat(stream=True)).encode())
        await _hang_up_after(sock, b"data: ")
        closed_at = trio.current_time()
        stats = await wait_for_stats(port, "cancelled", 1)
        assert trio.current_time() - closed_at < 0.1
        assert stats["completed"] == 0
        await wait_for_status(client, "echo", "in_flight", 0)


async def test_disconnect_of_a_non_streaming_request_cancels_upstream(state_dir: Path) -> None:
    config = make_config(
        state_dir, {"echo": {"cmd": echo_cmd("--tokens", "100", "--token-delay", "0.05")}}
    )
    async with running_daemon(config) as (info, client):
        await client.post("/admin/models/echo/load")
        port = await backend_port(client, "echo")
        sock = _raw_request(info.url, json.dumps(chat()).encode())
        await wait_for_stats(port, "started", 1)
        sock.close()
        closed_at = trio.current_time()
        await wait_for_stats(port, "cancelled", 1)
        assert trio.current_time() - closed_at < 0.1


async def test_disconnect_while_queued_frees_the_queue_slot(state_dir: Path) -> None:
    config = make_config(
        state_dir,
        {
            "echo": {
                "cmd": echo_cmd("--tokens", "100", "--token-delay", "0.05"),
                "max_concurrency": 1,
                "max_queue": 1,
            }
        },
    )
    async with running_daemon(config) as (info, client):
        await client.post("/admin/models/echo/load")
        port = await backend_port(client, "echo")
        body = json.dumps(chat()).encode()
        busy = _raw_request(info.url, body)
        await wait_for_stats(port, "started", 1)
        waiting = _raw_request(info.url, body)
        await wait_for_status(client, "echo", "queued", 1)
        waiting.close()
        await wait_for_status(client, "echo", "queued", 0)
        # The slot is really free: a new request can queue again instead of getting 429.
        again = _raw_request(info.url, body)
        await wait_for_status(client, "echo", "queued", 1)
        again.close()
        busy.close()
        await wait_for_status(client, "echo", "in_flight", 0)
        assert (await backend_stats(port))["started"] == 1
