"""A client that hangs up frees the model at once: the upstream request is cancelled within
100 ms, and a request waiting in the queue leaves it.

The backend's counters are read over one client opened before the hang-up (``direct``), so
that the 100 ms are the relay's and not the opening of a client per poll."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.support.config import echo_config
from tests.support.daemon import running_daemon
from tests.support.http import RawConnection, chat, raw_post
from tests.support.status import (
    backend_stats,
    direct_client,
    load_model,
    wait_for_stats,
    wait_for_status,
)


async def _chat_request(url: str, *, stream: bool = False) -> RawConnection:
    """A connection that has sent one chat request and reads nothing unless told to."""
    connection = await RawConnection.open(url)
    assert await connection.send(raw_post(chat(stream=stream)))
    return connection


@pytest.mark.quiet  # a 100 ms bound, in this trio run
async def test_disconnect_mid_stream_cancels_upstream_within_100ms(state_dir: Path) -> None:
    config = echo_config(state_dir, "--tokens", "200", "--token-delay", "0.05")
    async with running_daemon(config, admin=True) as (info, client), direct_client() as direct:
        port = (await load_model(client, "echo"))["port"]
        connection = await _chat_request(info.url, stream=True)
        await connection.read(lambda received: b"data: " in received)
        assert (await backend_stats(port, direct))["cancelled"] == 0
        await connection.aclose()
        closed_at = trio.current_time()
        stats = await wait_for_stats(port, "cancelled", 1, client=direct)
        assert trio.current_time() - closed_at < 0.1
        assert stats["completed"] == 0
        await wait_for_status(client, "echo", "in_flight", 0)


@pytest.mark.quiet  # a 100 ms bound, in this trio run
async def test_disconnect_of_a_non_streaming_request_cancels_upstream(state_dir: Path) -> None:
    config = echo_config(state_dir, "--tokens", "100", "--token-delay", "0.05")
    async with running_daemon(config, admin=True) as (info, client), direct_client() as direct:
        port = (await load_model(client, "echo"))["port"]
        connection = await _chat_request(info.url)
        assert (await wait_for_stats(port, "started", 1, client=direct))["cancelled"] == 0
        await connection.aclose()
        closed_at = trio.current_time()
        stats = await wait_for_stats(port, "cancelled", 1, client=direct)
        assert trio.current_time() - closed_at < 0.1
        assert stats["completed"] == 0


async def test_disconnect_while_queued_frees_the_queue_slot(state_dir: Path) -> None:
    config = echo_config(
        state_dir, "--tokens", "100", "--token-delay", "0.05", max_concurrency=1, max_queue=1
    )
    async with running_daemon(config, admin=True) as (info, client):
        port = (await load_model(client, "echo"))["port"]
        busy = await _chat_request(info.url)
        await wait_for_stats(port, "started", 1)
        waiting = await _chat_request(info.url)
        await wait_for_status(client, "echo", "queued", 1)
        await waiting.aclose()
        await wait_for_status(client, "echo", "queued", 0)
        # The slot is really free: a new request can queue again instead of getting 429.
        again = await _chat_request(info.url)
        await wait_for_status(client, "echo", "queued", 1)
        await again.aclose()
        await busy.aclose()
        await wait_for_status(client, "echo", "in_flight", 0)
        assert (await backend_stats(port))["started"] == 1
