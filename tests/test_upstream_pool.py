"""The relay's upstream side against real backends: keep-alive reuse, one ``receive_some`` per
socket read, a response closed early closes its connection (the backend sees the disconnect),
connections a backend closed are never reused (llama-server closes after every stream), a
pooled connection that dies under a request is retried once, idle ones are swept rather than
left in CLOSE_WAIT, and every connection is closed on shutdown, even a cancelled one."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio
import trio.testing

from tests.support.config import echo_cmd, make_config, model_server_cmd
from tests.support.daemon import running_daemon
from tests.support.echo import echo_backend, stop
from tests.support.http import chat
from tests.support.ports import free_port
from trioserve.errors import UpstreamError
from trioserve.gateway.upstream import KeepAlivePool, UpstreamConnection
from trioserve.supervision.model import Endpoint

PATH = "/v1/chat/completions"
BODY = json.dumps(chat(text="hi")).encode()

# A backend in plain sockets, one thread per connection, so that each test decides exactly
# what the connection does. Every answer names the client's port (which connection carried
# it) and how many requests the backend has seen in all.
#   keep          answers every request, keep-alive
#   once          answers the first request of a connection; closes at the second, unanswered
#   drop          closes every connection at its first request, unanswered
#   stream-close  one SSE answer (three events, one write) with "keep-alive", then closes, as
#                 llama-server does after every stream
BACKEND = r"""
import json, socket, sys, threading
mode = sys.argv[2]
server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
seen = 0
lock = threading.Lock()

def read_request(conn, buf):
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return None, b""
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(rest) < length:
        rest += conn.recv(65536)
    return head, rest[length:]

def serve(conn, peer):
    global seen
    buf, answered = b"", 0
    with conn:
        while True:
            head, buf = read_request(conn, buf)
            if head is None:
                return
            with lock:
                seen += 1
                info = json.dumps({"peer": peer, "seen": seen}).encode()
            if mode == "drop" or (mode == "once" and answered):
                return
            if mode == "stream-close":
                events = [b"data: " + info + b"\n\n", b"data: 2\n\n", b"data: 3\n\n"]
                chunks = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\nconnection: keep-alive\r\n\r\n"
                             + chunks)
                return
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n%s" % (len(info), info))
            answered += 1

print("ready", flush=True)
while True:
    conn, addr = server.accept()
    threading.Thread(target=serve, args=(conn, addr[1]), daemon=True).start()
"""


@asynccontextmanager
async def backend(mode: str) -> AsyncIterator[Endpoint]:
    port = free_port()
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", BACKEND, str(port), mode], stdout=subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        assert b"ready" in await process.stdout.receive_some()
        yield Endpoint(model="m", host="127.0.0.1", port=port)
    finally:
        with trio.CancelScope(shield=True):
            await stop(process)


@asynccontextmanager
async def pooled(
    mode: str, *, max_idle: int = 4, expiry: float = 60
) -> AsyncIterator[tuple[KeepAlivePool, Endpoint]]:
    """A pool, and a ``backend(mode)`` to reach through it."""
    async with (
        KeepAlivePool(max_idle_per_backend=max_idle, keepalive_expiry=expiry) as pool,
        backend(mode) as endpoint,
    ):
        yield pool, endpoint


async def post(pool: KeepAlivePool, endpoint: Endpoint, body: bytes = BODY) -> tuple[int, bytes]:
    """(status, whole body); the response is read to its end, so its connection goes back."""
    response = await pool.request(endpoint, PATH, body)
    try:
        return response.status, b"".join([chunk async for chunk in response])
    finally:
        response.close()


def tcp_states(port: int) -> list[str]:
    """States of this process's TCP connections to ``port``."""
    return [
        c.status
        for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port
    ]


async def test_sequential_requests_reuse_one_connection() -> None:
    async with pooled("keep", expiry=5) as (pool, endpoint):
        answers = [await post(pool, endpoint) for _ in range(5)]
        assert [status for status, _ in answers] == [200] * 5
        assert len({json.loads(body)["peer"] for _, body in answers}) == 1, answers
        assert pool.idle_count == 1


async def test_responses_open_at_once_use_their_own_connections_and_the_idle_limit_holds() -> None:
    async with pooled("keep", max_idle=2, expiry=5) as (pool, endpoint):
        # All six are open before any is read: each needs a connection of its own.
        responses = [await pool.request(endpoint, PATH, BODY) for _ in range(6)]
        peers = set()
        for response in responses:
            peers.add(json.loads(b"".join([chunk async for chunk in response]))["peer"])
            response.close()
        assert len(peers) == 6
        # Only two stay open afterwards.
        assert pool.idle_count == 2
        assert tcp_states(endpoint.port) == ["ESTABLISHED"] * 2


async def test_one_receive_some_returns_everything_one_socket_read_brought() -> None:
    async with pooled("stream-close", expiry=5) as (pool, endpoint):
        response = await pool.request(endpoint, PATH, BODY)
        try:
            assert response.is_event_stream
            # Three chunked events came in one write: one piece, for one client send.
            first = await response.receive_some()
            assert first.count(b"data: ") == 3, first
            assert first.endswith(b"data: 2\n\ndata: 3\n\n")
            assert await response.receive_some() == b""
        finally:
            response.close()


async def test_a_response_closed_early_closes_its_connection_and_the_backend_stops() -> None:
    async with (
        KeepAlivePool(max_idle_per_backend=4, keepalive_expiry=5) as pool,
        echo_backend("--tokens", "1000", "--token-delay", "0.01") as echo,
    ):
        port = echo.client.base_url.port
        assert port is not None
        endpoint = Endpoint(model="echo", host="127.0.0.1", port=port)
        body = json.dumps(chat(text="hi", stream=True)).encode()
        response = await pool.request(endpoint, PATH, body)
        assert await response.receive_some()
        response.close()  # one piece, then walk away
        assert pool.idle_count == 0
        stats = await echo.wait_stats("cancelled", 1)
        assert stats["cancelled"] == 1


async def test_a_backend_closing_after_every_stream_never_fails_a_request() -> None:
    async with pooled("stream-close") as (pool, endpoint):
        answers = [await post(pool, endpoint) for _ in range(3)]
    # Each found the last connection closed (or died on it and was retried): a new one each.
    assert [status for status, _ in answers] == [200] * 3
    peers = {
        json.loads(body.split(b"\n\n")[0].removeprefix(b"data: "))["peer"] for _, body in answers
    }
    assert len(peers) == 3


async def test_a_pooled_connection_closed_under_a_request_is_retried_once_on_a_fresh_one() -> None:
    async with pooled("once") as (pool, endpoint):
        # Requests 2 and 3 each go out on a pooled connection that looks alive (the
        # backend closes it only once the request is in), die unanswered, and are sent
        # again on a fresh connection.
        answers = [json.loads((await post(pool, endpoint))[1]) for _ in range(3)]
    assert len({answer["peer"] for answer in answers}) == 3
    assert [answer["seen"] for answer in answers] == [1, 3, 5]


async def test_a_fresh_connection_closed_before_answering_is_an_upstream_error() -> None:
    async with pooled("drop") as (pool, endpoint):
        with pytest.raises(UpstreamError, match="'m' closed the connection"):
            await post(pool, endpoint)
        assert pool.idle_count == 0


async def test_a_backend_that_is_not_listening_refuses_the_request() -> None:
    async with KeepAlivePool(max_idle_per_backend=4, keepalive_expiry=60) as pool:
        endpoint = Endpoint(model="m", host="127.0.0.1", port=free_port())
        with pytest.raises(UpstreamError, match="'m' refused the request"):
            await post(pool, endpoint)


async def test_an_idle_connection_past_its_keepalive_expiry_is_not_reused(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with pooled("keep", expiry=5) as (pool, endpoint):
        first = json.loads((await post(pool, endpoint))[1])["peer"]
        mock_clock.jump(4)
        assert json.loads((await post(pool, endpoint))[1])["peer"] == first
        mock_clock.jump(6)
        assert json.loads((await post(pool, endpoint))[1])["peer"] != first
        # The expired one was closed when it was found, not kept.
        assert tcp_states(endpoint.port) == ["ESTABLISHED"]


async def test_the_sweep_closes_idle_connections_of_a_backend_that_went_away() -> None:
    async with KeepAlivePool(max_idle_per_backend=4, keepalive_expiry=60) as pool:
        async with backend("keep") as endpoint:
            assert (await post(pool, endpoint))[0] == 200
            assert pool.idle_count == 1
        # The backend is gone: its side of the idle connection is closed, ours waits in
        # CLOSE_WAIT (the kernel's state; there is no event to wait for) until the sweep.
        with trio.fail_after(5):
            while tcp_states(endpoint.port) != ["CLOSE_WAIT"]:
                await trio.sleep(0.01)
        await pool.sweep()
        assert pool.idle_count == 0
        assert tcp_states(endpoint.port) == []


async def test_closing_the_pool_while_cancelled_still_closes_every_connection() -> None:
    pool = KeepAlivePool(max_idle_per_backend=8, keepalive_expiry=60)
    async with backend("keep") as endpoint:
        responses = [await pool.request(endpoint, PATH, BODY) for _ in range(4)]
        for response in responses:
            async for _ in response:
                pass
            response.close()
        assert pool.idle_count == 4
        assert tcp_states(endpoint.port) == ["ESTABLISHED"] * 4
        with trio.CancelScope() as scope:
            scope.cancel()
            await pool.aclose()
        assert pool.idle_count == 0
        assert tcp_states(endpoint.port) == []
        # A response finished after the close does not keep its connection either.
        assert (await post(pool, endpoint))[0] == 200
        assert pool.idle_count == 0
        assert tcp_states(endpoint.port) == []


async def test_a_failing_sweep_is_logged_and_the_daemon_keeps_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken_sweep(self: KeepAlivePool) -> None:
        raise OSError("sweep broke")

    monkeypatch.setattr(KeepAlivePool, "sweep", broken_sweep)
    state_dir = tmp_path / "state"
    config = make_config(state_dir, {"echo": {"cmd": echo_cmd()}})
    async with running_daemon(config, admin=True) as (_info, client):
        # Loading publishes lifecycle events, each of which runs a sweep.
        assert (await client.post("/admin/models/echo/load")).status_code == 200
        response = await client.post("/v1/chat/completions", json=chat(text="hi"))
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
        seen: list[dict[str, Any]] = []
        for user in ("a", "b"):
            response = await client.post(
                "/v1/chat/completions", json=chat("m", text=f"from {user}")
            )
            assert response.status_code == 200, response.text
            seen.append({k.lower(): v for k, v in response.json()["headers"].items()})
    # User a's answer set a cookie: user b's request must not carry it.
    assert "cookie" not in seen[1], seen[1]
    # Bodies are relayed as they come: a gzip answer would lose its Content-Encoding.
    assert all("gzip" not in h.get("accept-encoding", "") for h in seen), seen
    assert seen[0]["content-type"] == "application/json"
    assert seen[0]["host"].startswith("127.0.0.1:")


async def test_a_connect_the_kernel_cannot_finish_at_once_is_waited_for() -> None:
    # A listener whose accept queue is full (backlog 0: one connection) drops the next SYN, so
    # that connect is still in progress when it returns: the slow path of upstream._connect,
    # which otherwise finds loopback's handshake done at once. It completes once the queue has
    # room (the SYN is sent again about a second later).
    listener = trio.socket.socket()
    with listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        endpoint = Endpoint(model="m", host="127.0.0.1", port=port)
        queued = await UpstreamConnection.open(endpoint)
        opened: list[UpstreamConnection] = []

        async def connect() -> None:
            opened.append(await UpstreamConnection.open(endpoint))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(connect)
            await trio.testing.wait_all_tasks_blocked()
            assert not opened, "connected although the accept queue was full"
            first, _ = await listener.accept()
            with trio.fail_after(10):
                second, _ = await listener.accept()
        [connection] = opened
        assert connection.sock.getpeername() == ("127.0.0.1", port)
        for sock in (first, second):
            sock.close()
        queued.close()
        connection.close()


async def test_a_connection_the_backend_has_closed_is_not_kept_when_given_back() -> None:
    # llama-server closes its connection after every stream while announcing keep-alive: such
    # a connection is closed when its answer ends, not left for the next request to find dead.
    listener = trio.socket.socket()
    with listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen()
        endpoint = Endpoint(model="m", host="127.0.0.1", port=listener.getsockname()[1])
        async with KeepAlivePool(max_idle_per_backend=4, keepalive_expiry=60) as pool:
            alive = await UpstreamConnection.open(endpoint)
            alive_peer, _ = await listener.accept()
            dead = await UpstreamConnection.open(endpoint)
            dead_peer, _ = await listener.accept()
            dead_peer.close()
            with trio.fail_after(5):
                await trio.lowlevel.wait_readable(dead.sock)  # its end is here
            pool.give_back(dead)
            assert pool.idle_count == 0
            assert dead.sock.fileno() == -1
            pool.give_back(alive)
            assert pool.idle_count == 1
            alive_peer.close()
