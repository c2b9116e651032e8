"""Every deadline aborts the upstream request: 504 before the first byte, an error event after
it, and in both cases the backend sees the cancellation (its ``cancelled`` counter)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from tests.support.config import echo_config
from tests.support.daemon import running_daemon
from tests.support.http import assert_openai_error, chat, read_sse
from tests.support.status import load_model, wait_for_stats


@pytest.mark.parametrize("deadline", ["first_byte_timeout", "request_timeout"])
async def test_deadline_before_the_first_byte_gives_504_and_aborts_the_backend(
    state_dir: Path, deadline: str
) -> None:
    config = echo_config(state_dir, "--response-delay", "30", server={deadline: 0.5})
    async with running_daemon(config) as (_, client):
        port = (await load_model(client, "echo"))["port"]
        start = trio.current_time()
        response = await client.post("/v1/chat/completions", json=chat())
        error = assert_openai_error(response, 504, "timeout")
        assert deadline in error["message"], error
        assert trio.current_time() - start < 2
        await wait_for_stats(port, "cancelled", 1)


async def test_request_timeout_mid_stream_ends_with_an_error_event(state_dir: Path) -> None:
    config = echo_config(
        state_dir, "--tokens", "100", "--token-delay", "0.05", server={"request_timeout": 1}
    )
    async with running_daemon(config) as (_, client):
        port = (await load_model(client, "echo"))["port"]
        async with client.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as resp:
            assert resp.status_code == 200
            lines = await read_sse(resp)
        data = [line for line in lines if line.startswith("data: ")]
        assert len(data) > 3  # the stream had really begun
        last = json.loads(data[-1][len("data: ") :])
        assert last["error"]["code"] == "timeout"
        assert "data: [DONE]" not in lines
        await wait_for_stats(port, "cancelled", 1)


async def test_stream_idle_timeout_ends_a_stalled_stream(state_dir: Path) -> None:
    # Tokens every 2 s, idle limit 0.5 s: the gap between chunks trips it.
    config = echo_config(
        state_dir,
        "--tokens",
        "5",
        "--token-delay",
        "2",
        server={"stream_idle_timeout": 0.5, "first_byte_timeout": 10},
    )
    async with running_daemon(config) as (_, client):
        port = (await load_model(client, "echo"))["port"]
        response = await client.post("/v1/chat/completions", json=chat(stream=True))
        # Two seconds to the first token exceeds the idle limit only once streaming began;
        # before the first byte, first_byte_timeout rules. Either way: no hang, an error.
        assert response.status_code in (200, 504)
        if response.status_code == 200:
            assert '"code": "timeout"' in response.text
        await wait_for_stats(port, "cancelled", 1)
