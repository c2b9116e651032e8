"""Bad input from clients (issue 7): the right status in the OpenAI error shape, never a 500,
no model started for a request that is refused, and the daemon up and answering afterwards.

What ``tests/test_gateway_errors.py`` covers already (malformed JSON, arrays, a missing or
non-string ``model`` of some types, invalid UTF-8, deep arrays, unknown names in the body,
declared bodies over the limit) is not repeated here.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import trio

import trioserve.gateway.relay
from tests.support.admin import admin_header
from tests.support.config import SpawnCounter, make_config
from tests.support.daemon import leak_checked_daemon
from tests.support.http import (
    RawConnection,
    assert_openai_error,
    chat,
    raw_exchange,
    raw_post,
    status_of,
)
from tests.support.processes import model_processes
from trioserve.server import listener


async def _still_up(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health")).status_code == 200


# -- bodies ------------------------------------------------------------------------------------

DEEP_OBJECT = b'{"a":' * 100_000 + b"1" + b"}" * 100_000

BAD_BODIES = {
    "empty": b"",
    "whitespace": b" \r\n\t ",
    "null": b"null",
    "a-string": b'"echo"',
    "model-object": b'{"model": {"name": "echo"}}',
    "model-list": b'{"model": ["echo"]}',
    "model-true": b'{"model": true}',
    "bad-utf8-in-model": b'{"model": "ech\xff"}',
    "deep-inside-a-request": b'{"model": "echo", "messages": ' + DEEP_OBJECT + b"}",
    "truncated": b'{"model": "echo", "messages": [',
    "trailing-garbage": b'{"model": "echo"} {"model": "echo"}',
}


async def test_bodies_that_are_not_a_request_get_400_and_start_nothing(
    state_dir: Path, spawns: SpawnCounter
) -> None:
    config = make_config(state_dir, {"echo": {"cmd": spawns.cmd("echo")}})
    async with leak_checked_daemon(config) as (info, client):
        for name, body in BAD_BODIES.items():
            response = await client.post("/v1/chat/completions", content=body)
            assert response.status_code == 400, (name, response.text[:300])
            assert_openai_error(response, 400, "invalid_request")
        await _still_up(client)
        assert spawns.count("echo") == 0
        assert model_processes(info.instance) == {}


async def test_duplicate_model_keys_route_by_the_last_as_the_backend_reads_them(
    state_dir: Path,
) -> None:
    async with leak_checked_daemon(make_config(state_dir)) as (_, client):
        messages = json.dumps(chat()["messages"])
        last_known = f'{{"model": "nope", "messages": {messages}, "model": "echo"}}'
        response = await client.post("/v1/chat/completions", content=last_known)
        assert response.status_code == 200, response.text
        assert response.json()["model"] == "echo"
        last_unknown = f'{{"model": "echo", "messages": {messages}, "model": "nope"}}'
        error = assert_openai_error(
            await client.post("/v1/chat/completions", content=last_unknown),
            404,
            "model_not_found",
        )
        assert "'nope'" in error["message"]


async def test_huge_model_string_gets_404_quickly_and_no_metric_label(state_dir: Path) -> None:
    async with leak_checked_daemon(make_config(state_dir)) as (_, client):
        huge = "m" * 3_000_000  # under the 4 MiB body limit
        with trio.fail_after(10):
            response = await client.post("/v1/chat/completions", json=chat(huge))
        assert_openai_error(response, 404, "model_not_found")
        # The answer names the model, but not all 3 MB of it.
        assert len(response.content) < 2_000
        assert "mmmm" in response.json()["error"]["message"]
        # Unknown names never become metric labels: a client cannot grow /metrics (and every
        # scrape) without bound by inventing names.
        for i in range(50):
            response = await client.post("/v1/chat/completions", json=chat(f"made-up-{i}"))
            assert response.status_code == 404
        metrics = (await client.get("/metrics")).text
        assert "made-up-" not in metrics and "mmmmmmmm" not in metrics
        assert len(metrics) < 50_000
        await _still_up(client)


# Paths sent byte for byte (an HTTP client would normalise ``..`` and escape the rest).
NAMES_IN_PATHS = [
    b"..%2F..%2Fetc%2Fpasswd",
    b"..",
    b"a%20b",
    b"%24(touch%20PWNED)",
    b"%3Bls%20-la",
    b"%60id%60",
    b"echo%00",
    b"%C3%A9cho",
    b"%FF%FE",
    b"e" * 4000,
]


async def test_model_names_with_path_shell_and_odd_characters_are_just_unknown(
    state_dir: Path, spawns: SpawnCounter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # where a shell-expanded `touch PWNED` would land
    config = make_config(state_dir, {"echo": {"cmd": spawns.cmd("echo")}})
    async with leak_checked_daemon(config) as (info, client):
        admin = admin_header(state_dir)
        for name in NAMES_IN_PATHS:
            for method, action in [(b"POST", b"load"), (b"POST", b"unload"), (b"GET", b"logs")]:
                request = method + b" /admin/models/" + name + b"/" + action
                request += b" HTTP/1.1\r\nHost: x\r\n" + admin + b"\r\n"
                request += b"Content-Length: 0\r\nConnection: close\r\n\r\n"
                raw = await raw_exchange(info.url, request, within=5)
                head, _, body = raw.partition(b"\r\n\r\n")
                # Either no such model, or (a name with a slash in it) no such route.
                assert status_of(head) == 404, (request, raw[:300])
                error = json.loads(body)["error"]
                assert set(error) == {"message", "type", "code"}
                assert error["code"] in ("model_not_found", "not_found"), (request, error)
        for text in ["../echo", "echo/../echo", "a b", "$(touch PWNED)", "; ls", "echo\x00"]:
            response = await client.post("/v1/chat/completions", json=chat(text))
            assert_openai_error(response, 404, "model_not_found")
        # A lone surrogate (invalid UTF-8 that Python's JSON decoder lets through).
        response = await client.post(
            "/v1/chat/completions", content=b'{"model": "\xed\xa0\x80", "messages": []}'
        )
        assert_openai_error(response, 404, "model_not_found")
        await _still_up(client)
        assert not (tmp_path / "PWNED").exists()
        assert spawns.count("echo") == 0
        assert model_processes(info.instance) == {}


# -- bodies over the limit, bodies too slow ------------------------------------------------------


async def test_both_content_length_and_transfer_encoding_get_400_and_start_nothing(
    state_dir: Path, spawns: SpawnCounter
) -> None:
    config = make_config(state_dir, {"echo": {"cmd": spawns.cmd("echo")}})
    async with leak_checked_daemon(config) as (info, client):
        body = json.dumps(chat("echo")).encode()
        chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
        head = raw_post(b"", b"Transfer-Encoding: chunked", length=len(body))
        answer = await raw_exchange(info.url, head + chunked)
        assert status_of(answer) == 400, answer[:300]
        assert b"both Content-Length and Transfer-Encoding" in answer
        assert spawns.count("echo") == 0
        await _still_up(client)


async def test_chunked_body_over_the_limit_gets_413_before_it_ends(state_dir: Path) -> None:
    config = make_config(state_dir, server={"max_body_bytes": 1000})
    async with leak_checked_daemon(config) as (info, client):
        async with await RawConnection.open(info.url) as connection:
            assert await connection.send(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            # 1,100 bytes in 100-byte chunks, and no last chunk: the body never ends, so an
            # answer proves it was refused without being read to the end.
            for _ in range(11):
                await connection.send(b"64\r\n" + b"x" * 100 + b"\r\n")
            received = await connection.read(lambda r: b"request_too_large" in r, within=5)
            head, _, body = received.partition(b"\r\n\r\n")
            assert status_of(head) == 413
            assert json.loads(body)["error"]["code"] == "request_too_large"
            # It does not wait for the rest either: the connection is closed.
            await connection.read(within=5)
        await _still_up(client)


async def test_body_trickled_a_byte_at_a_time_is_cut_off_at_the_body_deadline(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch, spawns: SpawnCounter
) -> None:
    monkeypatch.setattr(trioserve.gateway.relay, "BODY_READ_TIMEOUT", 1.0)
    config = make_config(state_dir, {"echo": {"cmd": spawns.cmd("echo")}})
    async with leak_checked_daemon(config) as (info, client):
        body = json.dumps(chat()).encode()
        connection = await RawConnection.open(info.url)
        async with connection, trio.open_nursery() as nursery:
            await connection.send(raw_post(b"", length=len(body)))
            start = trio.current_time()

            async def trickle() -> None:
                # A slow client, by design: one byte every 0.2 s, far slower than the deadline.
                for byte in body:
                    if not await connection.send(bytes([byte])):
                        return
                    await trio.sleep(0.2)

            nursery.start_soon(trickle)
            received = await connection.read(within=10)  # to the server's close
            closed_after = trio.current_time() - start
            nursery.cancel_scope.cancel()
        head, _, payload = received.partition(b"\r\n\r\n")
        assert status_of(head) == 408, received[:300]
        assert json.loads(payload)["error"]["code"] == "invalid_request"
        assert 1.0 <= closed_after < 4.0, closed_after
        assert spawns.count("echo") == 0
        await _still_up(client)


# -- headers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "piece"),
    [(40_000, 1000), (200_000, 200_000), (2_000_000, 65536)],
    ids=["40KB-in-pieces", "200KB-at-once", "2MB"],
)
async def test_headers_over_the_limit_get_431_and_the_connection_closes(
    state_dir: Path, size: int, piece: int
) -> None:
    # Hypercorn's h11_max_incomplete_size (32 KiB) bounds what is buffered before the head is
    # complete. A head that arrives whole in one read (up to 64 KiB) is not "incomplete" and
    # passes, so the sizes here are ones that must cross the limit while still incomplete.
    async with leak_checked_daemon(make_config(state_dir)) as (info, client):
        request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size + b"\r\n\r\n"
        async with await RawConnection.open(info.url) as connection:
            for i in range(0, len(request), piece):
                if not await connection.send(request[i : i + piece]):
                    break  # refused before it was all sent
                if i == 0 and piece < size:
                    # The client pauses (by design) past the accept-time look at the first
                    # bytes (listener.PEEK_WAIT): from here on Hypercorn reads the pieces as
                    # they come, instead of finding the whole head waiting in one read.
                    await trio.sleep(listener.PEEK_WAIT + 0.3)
                elif piece < size:
                    await trio.sleep(0.001)  # pieces apart, as a slow sender's
            received = await connection.read(within=5)  # to the server's close
        assert status_of(received) == 431, received[:300]
        assert b"connection: close" in received.lower()
        await _still_up(client)
