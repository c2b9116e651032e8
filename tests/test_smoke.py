"""The walking skeleton end to end: health, a chat answer, a stream relayed as it is produced."""

from __future__ import annotations

from contextlib import aclosing
from pathlib import Path

import trio

from tests.support.config import echo_config, make_config
from tests.support.daemon import running_daemon
from tests.support.http import chat, sse_lines
from tests.support.status import load_model


async def test_health_and_chat_through_the_daemon(state_dir: Path) -> None:
    config = make_config(state_dir)
    async with running_daemon(config) as (_, client):
        health = await client.get("/health")
        assert health.json() == {"status": "ok"}
        reply = await client.post("/v1/chat/completions", json=chat(text="hello world"))
        assert reply.status_code == 200
        assert reply.json()["choices"][0]["message"]["content"].startswith("hello world")


async def test_stream_first_chunk_arrives_before_the_backend_finishes(state_dir: Path) -> None:
    config = echo_config(state_dir, "--tokens", "10", "--token-delay", "0.3")
    async with running_daemon(config, admin=True) as (_, client):
        await load_model(client, "echo")
        start = trio.current_time()
        body = chat(stream=True, text="a b")
        async with (
            client.stream("POST", "/v1/chat/completions", json=body) as response,
            aclosing(sse_lines(response)) as lines,
        ):
            async for line in lines:
                if line.startswith("data: "):
                    first_after = trio.current_time() - start
                    break
        # The whole answer takes 10 × 0.3 s = 3 s; the first chunk must come long before.
        assert first_after < 1.5
