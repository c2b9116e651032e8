"""The walking skeleton end to end: health, a chat answer, a stream relayed as it is produced."""

from __future__ import annotations

from contextlib import aclosing
from pathlib import Path

import trio

from tests.conftest import echo_cmd, make_config, running_daemon


async def test_health_and_chat_through_the_daemon(state_dir: Path) -> None:
    config = make_config(state_dir)
    async with running_daemon(config) as (_, client):
        health = await client.get("/health")
        assert health.json() == {"status": "ok"}
        reply = await client.post(
            "/v1/chat/completions",
            json={"model": "echo", "messages": [{"role": "user", "content": "hello world"}]},
        )
        assert reply.status_code == 200
        assert reply.json()["choices"][0]["message"]["content"].startswith("hello world")


async def test_stream_first_chunk_arrives_before_the_backend_finishes(state_dir: Path) -> None:
    config = make_config(
        state_dir, {"echo": {"cmd": echo_cmd("--tokens", "10", "--token-delay", "0.3")}}
    )
    async with running_daemon(config) as (_, client):
        await client.post("/admin/models/echo/load")
        start = trio.current_time()
        body = {"model": "echo", "stream": True, "messages": [{"role": "user", "content": "a b"}]}
        async with (
            client.stream("POST", "/v1/chat/completions", json=body) as response,
            aclosing(response.aiter_lines()) as lines,
        ):
            async for line in lines:
                if line.startswith("data: "):
                    first_after = trio.current_time() - start
                    break
        # The whole answer takes 10 × 0.3 s = 3 s; the first chunk must come long before.
        assert first_after < 1.5
