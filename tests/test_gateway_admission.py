"""Bounded queues: ``max_concurrency`` upstream, ``max_queue`` waiting, 429 beyond, FIFO."""

from __future__ import annotations

from pathlib import Path

import trio

from tests.support.config import echo_config
from tests.support.daemon import running_daemon
from tests.support.http import assert_openai_error, chat
from tests.support.status import (
    backend_stats,
    direct_client,
    load_model,
    model_status,
    wait_for_status,
)


async def test_full_queue_gives_429_with_retry_after(state_dir: Path) -> None:
    config = echo_config(state_dir, "--response-delay", "1", max_concurrency=1, max_queue=2)
    async with running_daemon(config, admin=True) as (_, client):
        await load_model(client, "echo")
        statuses: list[int] = []

        async def call() -> None:
            statuses.append((await client.post("/v1/chat/completions", json=chat())).status_code)

        async with trio.open_nursery() as nursery:
            for _ in range(3):  # one upstream, two queued
                nursery.start_soon(call)
            await wait_for_status(client, "echo", "queued", 2)
            refused = await client.post("/v1/chat/completions", json=chat())
            assert_openai_error(refused, 429, "queue_full")
            assert int(refused.headers["retry-after"]) >= 1
        assert statuses == [200, 200, 200]


async def test_queued_requests_proceed_in_arrival_order(state_dir: Path) -> None:
    config = echo_config(state_dir, "--response-delay", "0.2", max_concurrency=1, max_queue=10)
    async with running_daemon(config, admin=True) as (_, client), direct_client() as direct:
        port = (await load_model(client, "echo"))["port"]
        finished: list[int] = []

        async def call(i: int) -> None:
            response = await client.post("/v1/chat/completions", json=chat(text=f"n{i}"))
            assert response.status_code == 200
            finished.append(i)

        async def arrived(count: int) -> None:
            """Until ``count`` requests have reached the daemon: sent to the backend (its own
            count, which never goes down) or queued. Read in that order, a request moving
            from the queue to the backend in between is missed (read again), never counted
            twice. (The first requests may be done before the last arrive, on a slow run.)"""
            with trio.fail_after(10):
                while True:
                    started = (await backend_stats(port, direct))["started"]
                    if started + (await model_status(client, "echo"))["queued"] >= count:
                        return
                    await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(call, i)
                # Each one is upstream or queued before the next arrives.
                await arrived(i + 1)
        assert finished == [0, 1, 2, 3, 4]
