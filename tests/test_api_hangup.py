"""A client that hangs up cancels its upstream request at once, on every API: the echo counts
the generation as cancelled (``/stats``) within a second or two of the hang-up, long before
it would have completed, and never as completed.

Each request goes over a raw connection that the test closes at its chosen moment: a
non-streaming one once the echo has started generating it (non-streaming Responses and
Messages requests go upstream as streams), a streaming one once its first event is in."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import httpx

from tests.support.config import echo_cmd, make_config
from tests.support.daemon import running_daemon
from tests.support.http import RawConnection, raw_post
from tests.support.status import (
    backend_stats,
    direct_client,
    load_models,
    wait_for_stats,
    wait_for_status,
)

# Far beyond the wait: a cancellation is the hang-up's, not the end of the generation.
CANCELLED_WITHIN = 2.0
# 200 tokens 50 ms apart: 10 s of generation.
LONG = ("--tokens", "200", "--token-delay", "0.05")
# Speech (8 chunks) and a transcription (a dozen words) at 2 s a token: tens of seconds.
SLOW = ("--token-delay", "2")
TEXT = [{"role": "user", "content": "keep talking"}]


def multipart(model: str, data: bytes) -> bytes:
    """A transcription form: the file, then ``model``."""
    return (
        b'--bnd\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        b"Content-Type: audio/wav\r\n\r\n"
        + data
        + b'\r\n--bnd\r\nContent-Disposition: form-data; name="model"\r\n\r\n'
        + model.encode()
        + b"\r\n--bnd--\r\n"
    )


def upload_request(model: str) -> bytes:
    body = multipart(model, hashlib.shake_256(b"hang up").digest(100_000))
    return (
        b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: multipart/form-data; boundary=bnd\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


async def hang_up_and_see_it_cancelled(
    url: str,
    client: httpx.AsyncClient,
    direct: httpx.AsyncClient,
    model: str,
    port: int,
    request: bytes,
    *,
    streaming: bool,
) -> None:
    """Send ``request``; once under way, hang up; the echo cancels it at once."""
    before = await backend_stats(port, direct)
    async with await RawConnection.open(url) as connection:
        assert await connection.send(request)
        if streaming:
            await connection.read(lambda received: b"data: " in received)
        else:
            await wait_for_stats(port, "started", before["started"] + 1, client=direct)
        assert (await backend_stats(port, direct))["cancelled"] == before["cancelled"]
    stats = await wait_for_stats(
        port, "cancelled", before["cancelled"] + 1, within=CANCELLED_WITHIN, client=direct
    )
    assert stats["completed"] == before["completed"], (request[:60], stats)
    await wait_for_status(client, model, "in_flight", 0)


async def test_hanging_up_on_responses_and_messages_cancels_upstream(state_dir: Path) -> None:
    config = make_config(state_dir, {"long": {"cmd": echo_cmd(*LONG)}})
    requests: list[tuple[str, dict[str, Any]]] = [
        ("/v1/responses", {"model": "long", "input": "keep talking"}),
        ("/v1/messages", {"model": "long", "max_tokens": 1000, "messages": TEXT}),
    ]
    async with running_daemon(config, admin=True) as (info, client), direct_client() as direct:
        port = (await load_models(client, "long"))[0]["port"]
        for path, body in requests:
            for streaming in (False, True):
                raw = raw_post({**body, "stream": streaming}, path=path)
                await hang_up_and_see_it_cancelled(
                    info.url, client, direct, "long", port, raw, streaming=streaming
                )
        assert (await backend_stats(port, direct))["cancelled"] == 4


async def test_hanging_up_on_the_other_apis_cancels_upstream(state_dir: Path) -> None:
    models = {"long": {"cmd": echo_cmd(*LONG)}, "slow": {"cmd": echo_cmd(*SLOW)}}
    async with running_daemon(make_config(state_dir, models), admin=True) as (info, client):
        long, slow = (entry["port"] for entry in await load_models(client, "long", "slow"))
        cases: list[tuple[str, int, bytes, bool]] = [
            (
                "long",
                long,
                raw_post({"model": "long", "prompt": "go", "stream": True}, path="/completion"),
                True,
            ),
            (
                "long",
                long,
                raw_post(
                    {"model": "long", "input_prefix": "a", "input_suffix": "b"}, path="/infill"
                ),
                False,
            ),
            (
                "slow",
                slow,
                raw_post({"model": "slow", "input": "say this"}, path="/v1/audio/speech"),
                False,
            ),
            ("slow", slow, upload_request("slow"), False),
        ]
        async with direct_client() as direct:
            for model, port, raw, streaming in cases:
                await hang_up_and_see_it_cancelled(
                    info.url, client, direct, model, port, raw, streaming=streaming
                )
