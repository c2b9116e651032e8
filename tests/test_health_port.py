"""``[server] health_port``: plain-HTTP ``/health`` on loopback, answered at accept time by the
same machinery and ``Liveness`` as the main port (draining included), with and without TLS;
anything else there is 404, without the app."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest
import trio

from tests.support.config import echo_config
from tests.support.daemon import leak_checked_daemon, running_daemon
from tests.support.http import chat, status_of
from tests.support.ports import free_port
from tests.support.tls import Certificates
from trioserve.daemon import DaemonError, DaemonInfo, run_daemon
from trioserve.server import hypercorn_serve
from trioserve.server.listener import Liveness
from trioserve.server.sockets import bind_health_port


def _url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def _blocking_exchange(port: int, pieces: tuple[bytes, ...], between: Callable[[], None]) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        for number, piece in enumerate(pieces):
            if number:
                between()
            conn.sendall(piece)
        answer = bytearray()
        while chunk := conn.recv(65536):
            answer += chunk
    return bytes(answer)


async def _exchange(port: int, *pieces: bytes, between: Callable[[], None] = lambda: None) -> bytes:
    """Send ``pieces`` on a new connection (calling ``between`` before each after the first);
    all the answer until it closed. A plain blocking socket in a thread: what a probe does,
    and no HTTP client's second opinion on what the answer means."""
    return await trio.to_thread.run_sync(lambda: _blocking_exchange(port, pieces, between))


def _listening(port: int) -> list[str]:
    return [
        conn.laddr.ip
        for conn in psutil.Process().net_connections("tcp")
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port
    ]


async def test_health_port_answers_health_and_nothing_else(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Set when the health port's own handler gets a connection: one the listeners did not
    # answer at accept time.
    handled = threading.Event()
    answer_later = hypercorn_serve.answer_on_health_port

    async def answer_on_health_port(liveness: Liveness, stream: trio.SocketStream) -> None:
        handled.set()
        await answer_later(liveness, stream)

    monkeypatch.setattr(hypercorn_serve, "answer_on_health_port", answer_on_health_port)

    def until_handed_to_the_handler() -> None:
        assert handled.wait(timeout=30), "the first piece never reached the health port handler"

    port = free_port()
    config = echo_config(state_dir, server={"health_port": port})
    async with leak_checked_daemon(config) as (_, client):
        answer = await _exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(answer) == 200, answer
        assert answer.endswith(b'\r\n\r\n{"status":"ok"}'), answer
        head = await _exchange(port, b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(head) == 200 and head.endswith(b"\r\n\r\n"), head
        # A probe that sends its request in pieces: not complete when accepted (the rest is
        # sent only once the handler has the connection), so answered by the health port's own
        # handler, still without the app.
        handled.clear()
        slow = await _exchange(
            port,
            b"GET /health HTTP/1.1\r\nHost: x\r\n",
            b"\r\n",
            between=until_handed_to_the_handler,
        )
        assert status_of(slow) == 200 and slow.endswith(b'{"status":"ok"}'), slow
        async with httpx.AsyncClient(base_url=_url(port), timeout=5, trust_env=False) as http:
            for method, path in [("GET", "/v1/models"), ("POST", "/admin/reload"), ("GET", "/")]:
                refused = await http.request(method, path)
                assert refused.status_code == 404, (method, path, refused.text)
                assert refused.json()["error"]["code"] == "not_found"
        # Only on loopback.
        assert _listening(port) == ["127.0.0.1"]
        # The main port is unchanged.
        assert (await client.get("/health")).json() == {"status": "ok"}
        assert (await client.get("/v1/models")).status_code == 200


async def test_health_port_with_tls_on_the_main_port(state_dir: Path, tmp_path: Path) -> None:
    certs = Certificates(tmp_path / "tls")
    port = free_port()
    config = echo_config(state_dir, server={"health_port": port, **certs.server_settings()})
    async with leak_checked_daemon(config) as (info, _):
        assert info.url.startswith("https://")
        answer = await _exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(answer) == 200 and answer.endswith(b'{"status":"ok"}'), answer
        async with httpx.AsyncClient(
            base_url=info.url, verify=certs.client_context(), timeout=30, trust_env=False
        ) as https:
            assert (await https.post("/v1/chat/completions", json=chat())).status_code == 200


async def test_health_port_says_draining_while_the_daemon_drains(state_dir: Path) -> None:
    port = free_port()
    # The drain lasts while a request is in flight (for at most half the grace): this test's
    # stream (2,000 tokens: 100 s) holds it until the test has seen the answer, then ends.
    config = echo_config(
        state_dir,
        "--tokens",
        "2000",
        "--token-delay",
        "0.05",
        server={"health_port": port, "shutdown_grace": 60},
    )
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        info: DaemonInfo = await nursery.start(
            lambda task_status: run_daemon(
                config, shutdown_trigger=stop.wait, task_status=task_status
            )
        )
        async with (
            httpx.AsyncClient(base_url=info.url, timeout=30, trust_env=False) as client,
            client.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as streamed,
        ):
            assert streamed.status_code == 200
            stop.set()
            # The stop reaches the drain through the loop; the probe sees it from outside.
            with trio.fail_after(20):
                while (
                    status_of(
                        answer := await _exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                    )
                    == 200
                ):
                    await trio.sleep(0.02)
            assert status_of(answer) == 503, answer
            assert answer.endswith(b'{"status":"draining"}'), answer
        # The stream is closed: nothing in flight, the drain ends and the daemon stops.
    # Closed with the main port.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


async def test_a_health_port_in_use_refuses_the_start(state_dir: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(DaemonError) as refused:
            await run_daemon(echo_config(state_dir, server={"health_port": port}))
    message = str(refused.value)
    assert message.startswith(f"cannot listen on 127.0.0.1:{port} ([server] health_port)"), message
    # The admin socket was made before the health port was tried: the failure removed it.
    assert not (state_dir / "admin.sock").exists()


def test_the_health_port_is_bound_but_not_yet_listening() -> None:
    # It listens once, as the main port's plain sockets do (listening.Listening.accept_at_once).
    with bind_health_port(free_port()) as sock:
        assert sock.getsockname()[0] == "127.0.0.1"
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 0


async def test_no_health_port_by_default(state_dir: Path) -> None:
    async with running_daemon(echo_config(state_dir)) as (info, _):
        listening = {
            conn.laddr.port
            for conn in psutil.Process().net_connections("tcp")
            if conn.status == psutil.CONN_LISTEN
        }
        assert listening == {int(info.url.rsplit(":", 1)[1])}, listening
