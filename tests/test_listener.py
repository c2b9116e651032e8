"""``/health`` without the event loop: answered at accept time or by the take-over thread, even
while the loop is blocked; every other request still reaches Hypercorn intact."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import trio

from tests.conftest import echo_cmd, make_config, running_daemon
from trioserve import daemon
from trioserve.server import listener
from trioserve.server.listener import Verdict, classify

HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize(
    ("first_bytes", "verdict"),
    [
        (HEALTH, Verdict.HEALTH),
        (b"HEAD /health HTTP/1.0\r\n\r\n", Verdict.HEALTH),
        (b"GET /heal", Verdict.OTHER),
        (b"GET /health HTTP/1.1\r\nHost: x\r\n", Verdict.OTHER),
        (b"GET /healthz HTTP/1.1\r\n\r\n", Verdict.OTHER),
        (b"GET /health?verbose=1 HTTP/1.1\r\n\r\n", Verdict.OTHER),
        (b"POST /health HTTP/1.1\r\n\r\n", Verdict.OTHER),
        (b"POST /v1/chat/completions HTTP/1.1\r\n", Verdict.OTHER),
        (b"GET /health HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", Verdict.OTHER),
        (b"", Verdict.GONE),
    ],
)
def test_first_bytes_are_classified(first_bytes: bytes, verdict: Verdict) -> None:
    assert classify(first_bytes) is verdict


def _raw(url: str, request: bytes) -> tuple[bytes, float]:
    """Send one raw request on a fresh connection; (whole answer, seconds it took)."""
    host, port = url.removeprefix("http://").split(":")
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer, time.monotonic() - started


def _in_thread(url: str, request: bytes, results: list[tuple[bytes, float]]) -> threading.Thread:
    thread = threading.Thread(target=lambda: results.append(_raw(url, request)))
    thread.start()
    return thread


def _config(state_dir: Path):  # type: ignore[no-untyped-def]
    return make_config(state_dir, {"echo": {"cmd": echo_cmd()}})


async def test_health_is_answered_while_the_event_loop_is_blocked(state_dir: Path) -> None:
    async with running_daemon(_config(state_dir)) as (info, _client):
        results: list[tuple[bytes, float]] = []
        probe = _in_thread(info.url, HEALTH, results)
        # The loop runs nothing for a second: neither an accept nor any request.
        time.sleep(1.0)  # blocking the loop is the point
        probe.join()
        [(answer, seconds)] = results
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        assert answer.endswith(b'{"status":"ok"}')
        assert seconds < 0.5


async def test_other_requests_sent_while_the_loop_is_blocked_are_served_after(
    state_dir: Path,
) -> None:
    async with running_daemon(_config(state_dir)) as (info, _client):
        results: list[tuple[bytes, float]] = []
        request = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        probe = _in_thread(info.url, request, results)
        time.sleep(0.5)  # the thread takes the connection meanwhile
        await trio.to_thread.run_sync(probe.join)
        [(answer, _)] = results
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert [m["id"] for m in json.loads(body)["data"]] == ["echo"]


async def test_health_says_stalled_when_the_loop_has_not_run(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(listener, "LOOP_STALL_AFTER", 0.3)
    async with running_daemon(_config(state_dir)) as (info, client):
        results: list[tuple[bytes, float]] = []

        def late_probe() -> None:
            time.sleep(0.8)  # the loop has been stuck longer than LOOP_STALL_AFTER by then
            results.append(_raw(info.url, HEALTH))

        probe = threading.Thread(target=late_probe)
        probe.start()
        time.sleep(1.5)  # a loop stuck this long is what 503 reports
        probe.join()
        [(answer, _)] = results
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        assert b'"status":"stalled"' in answer
        # Once the loop runs again, it is healthy again.
        await trio.sleep(listener.LOOP_TICK + 0.1)
        assert (await client.get("/health")).json() == {"status": "ok"}


async def test_head_health_has_no_body(state_dir: Path) -> None:
    async with running_daemon(_config(state_dir)) as (info, _client):
        answer, _ = await trio.to_thread.run_sync(
            _raw, info.url, b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert answer.endswith(b"\r\n\r\n")
        assert b"content-length: 15" in answer


async def test_a_client_slow_to_send_its_request_is_still_served(state_dir: Path) -> None:
    async with running_daemon(_config(state_dir)) as (info, _client):

        def slow_client() -> bytes:
            host, port = info.url.removeprefix("http://").split(":")
            with socket.create_connection((host, int(port)), timeout=10) as conn:
                time.sleep(listener.PEEK_WAIT + 0.3)
                conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                answer = b""
                while chunk := conn.recv(65536):
                    answer += chunk
                return answer

        answer = await trio.to_thread.run_sync(slow_client)
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert answer.endswith(b'{"status":"ok"}')


async def test_listening_socket_is_closed_after_shutdown(state_dir: Path) -> None:
    async with running_daemon(_config(state_dir)) as (info, _client):
        url = info.url
    host, port = url.removeprefix("http://").split(":")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=2).close()


async def test_a_failed_take_over_thread_is_logged_and_the_daemon_keeps_serving(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self: object) -> None:
        raise RuntimeError("take-over thread broke")

    monkeypatch.setattr(listener._TakeOverThread, "run", broken)
    async with running_daemon(_config(state_dir)) as (_info, client):
        # The loop accepts everything itself, /health included.
        assert (await client.get("/health")).json() == {"status": "ok"}
        assert (await client.get("/v1/models")).status_code == 200
    assert "the accept take-over thread failed" in caplog.text
    assert "take-over thread broke" in caplog.text


def test_the_thread_never_blocks_a_stop_while_trio_takes_no_more_connections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(listener, "MAX_HANDED_OVER", 1)
    handed: list[socket.socket] = []
    with socket.create_server(("127.0.0.1", 0)) as server:
        thread = listener._TakeOverThread(server, handed.append, listener.Liveness())
        first, second = socket.socketpair()
        try:
            thread._give(first)  # takes the only slot; trio never takes it (shutting down)
            thread.stop()
            started = time.monotonic()
            thread._give(second)  # would wait for a slot forever
            assert time.monotonic() - started < 1
            assert handed == [first]
            assert second.fileno() == -1  # closed, not leaked
        finally:
            first.close()
            second.close()
            thread.close()


async def test_the_daemon_asks_for_1ms_gil_hand_overs_and_puts_the_setting_back(
    state_dir: Path,
) -> None:
    # The health thread needs the GIL several times per probe; the default 5 ms per hand-over
    # made probes under load take up to 28 ms (bench/load.py b).
    before = sys.getswitchinterval()
    async with running_daemon(_config(state_dir)):
        assert sys.getswitchinterval() == daemon.SWITCH_INTERVAL <= 0.001
    assert sys.getswitchinterval() == before


async def test_one_accept_drains_the_queue_and_answers_a_probe_queued_behind_others() -> None:
    # 1,000 clients connecting at once must not put a probe behind hundreds of loop passes.
    with socket.create_server(("127.0.0.1", 0)) as listen_socket:
        listen_socket.setblocking(False)
        address = listen_socket.getsockname()
        others = [socket.create_connection(address) for _ in range(20)]
        for conn in others:
            conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        probe = socket.create_connection(address)
        probe.sendall(HEALTH)
        direct = listener.DirectListener(
            listen_socket, listener.TakenOverConnections(listen_socket)
        )
        streams: list[trio.SocketStream] = []
        try:
            first = await direct.accept()
            # Answered in that same pass, before any other connection was handed out.
            probe.setblocking(False)
            assert probe.recv(65536).startswith(b"HTTP/1.1 200 ")
            # The rest come without waiting for the socket again.
            with trio.fail_after(1):
                streams = [first] + [await direct.accept() for _ in range(19)]
            ports = {s.socket.getpeername()[1] for s in streams}
            assert ports == {c.getsockname()[1] for c in others}
        finally:
            for stream in streams:
                await stream.aclose()
            for conn in [*others, probe]:
                conn.close()
            await direct.aclose()
