"""Sending to clients: a client slower than its stream still gets every byte in order, a client
that stops reading is cut off (its upstream request aborted), and what one upstream read brought
goes out in one send."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.support.config import echo_cmd, make_config, model_server_cmd
from tests.support.daemon import running_daemon
from tests.support.http import RawConnection, chat, raw_post, response_complete
from tests.support.status import backend_port, wait_for_stats, wait_for_status
from trioserve.backends.echo import reply_tokens
from trioserve.gateway.downstream import Downstream
from trioserve.server import hypercorn_serve

WORDS = " ".join(f"w{i}" for i in range(50))


# A small receive window, so the daemon's sends soon find the socket full.
RECEIVE_BUFFER = 4096


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return bytes(out)
        out += body[:size]
        body = body[size + 2 :]


async def test_a_client_slower_than_its_stream_gets_every_token_in_order(
    state_dir: Path,
) -> None:
    tokens = 8_000  # ~1.2 MB of events: far more than the socket buffers hold (4 KB window)
    config = make_config(
        state_dir, {"echo": {"cmd": echo_cmd("--tokens", str(tokens), "--token-delay", "0")}}
    )
    async with running_daemon(config, admin=True) as (info, client):
        await client.post("/admin/models/echo/load")
        async with await RawConnection.open(info.url, receive_buffer=RECEIVE_BUFFER) as conn:
            await conn.send(raw_post(chat(stream=True, text=WORDS)))
            # The daemon fills the socket and must wait for us (partial writes) before we
            # read a byte.
            await conn.wait_server_unsent(RECEIVE_BUFFER)
            raw = await conn.read(within=60)
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        events = [e for e in _dechunk(body).split(b"\n\n") if e.startswith(b"data: {")]
        text = "".join(json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in events)
        assert text == "".join(reply_tokens(WORDS, tokens))
        assert _dechunk(body).endswith(b"data: [DONE]\n\n")


async def test_a_client_that_stops_reading_is_cut_off_and_its_upstream_aborted(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hypercorn_serve, "SEND_LIMIT", 1.0)
    config = make_config(
        state_dir, {"echo": {"cmd": echo_cmd("--tokens", "1000000", "--token-delay", "0")}}
    )
    async with running_daemon(config, admin=True) as (info, client):
        await client.post("/admin/models/echo/load")
        port = await backend_port(client, "echo")
        async with await RawConnection.open(info.url, receive_buffer=RECEIVE_BUFFER) as conn:
            await conn.send(raw_post(chat(stream=True)))
            await wait_for_stats(port, "started", 1)
            started = trio.current_time()
            # Never read: once the socket is full, SEND_LIMIT later the daemon gives up.
            stats = await wait_for_stats(port, "cancelled", 1, within=20)
            assert trio.current_time() - started >= 1.0
            assert stats["completed"] == 0
            await wait_for_status(client, "echo", "in_flight", 0)
            # The daemon closed its side: what is buffered ends, it does not go on forever.
            conn.stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            await conn.read(within=10)
        assert (await client.get("/health")).status_code == 200


async def test_a_slow_but_steady_reader_of_a_large_answer_is_never_cut_off(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The limit is on progress, not on the whole send: this answer takes ~3 s to read, three
    # times SEND_LIMIT, and the client never stops for long.
    monkeypatch.setattr(hypercorn_serve, "SEND_LIMIT", 1.0)
    tokens = 200_000
    # Relayed whole (not assembled from a stream): the test is about the send to the client,
    # and assembling 200,000 events would cost the daemon far more time than the reading.
    model = {"cmd": echo_cmd("--tokens", str(tokens)), "stream_upstream": False}
    config = make_config(state_dir, {"echo": model})
    async with running_daemon(config, admin=True) as (info, client):
        await client.post("/admin/models/echo/load")
        received = bytearray()
        async with await RawConnection.open(info.url, receive_buffer=RECEIVE_BUFFER) as conn:
            await conn.send(raw_post(chat(text="a")))
            with trio.fail_after(60):
                while not response_complete(received):
                    data = await conn.stream.receive_some(16384)
                    assert data, f"closed before the whole answer: {bytes(received[:300])!r}"
                    received += data
                    await trio.sleep(0.05)  # ~300 KB/s
        answer = json.loads(bytes(received).partition(b"\r\n\r\n")[2])
        assert answer["choices"][0]["message"]["content"] == "".join(reply_tokens("a", tokens))


# A stream that dies in the middle of its second event.
DIES_MID_EVENT = """
self.send_response(200)
self.send_header("content-type", "text/event-stream")
self.send_header("transfer-encoding", "chunked")
self.end_headers()
for piece in (b'data: {"choices": []}\\n\\n', b'data: {"choi'):
    self.wfile.write(b"%x\\r\\n%s\\r\\n" % (len(piece), piece))
self.wfile.flush()
self.connection.shutdown(socket.SHUT_RDWR)
"""


async def test_a_stream_that_dies_mid_event_ends_with_an_error_event_of_its_own(
    state_dir: Path,
) -> None:
    config = make_config(state_dir, {"m": {"cmd": model_server_cmd(DIES_MID_EVENT)}})
    async with running_daemon(config) as (_info, client):
        response = await client.post("/v1/chat/completions", json=chat("m", stream=True))
        assert response.status_code == 200
        events = [e for e in response.text.split("\n\n") if e]
        # The half event stays half; the error is an event of its own, and the last one.
        assert events[-2].startswith('data: {"choi'), events
        error = json.loads(events[-1].removeprefix("data: "))["error"]
        assert error["code"] == "upstream_error", error


async def test_bytes_written_before_a_flush_go_out_in_one_send() -> None:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    out = Downstream(send)
    await out.start(200, [(b"content-type", b"text/event-stream")])
    for piece in (b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n"):
        out.write(piece)
    await out.flush()
    await out.flush()  # nothing held: nothing sent
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[1]["body"] == b"data: 1\n\ndata: 2\n\ndata: 3\n\n"
    assert out.is_event_stream and out.at_event_boundary
