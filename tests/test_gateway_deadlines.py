"""Every deadline aborts the upstream request: 504 before the first byte, an error event after
it, and in both cases the backend sees the cancellation (its ``cancelled`` counter)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import trio

from tests.support.config import daemon_config, echo_cmd, echo_config
from tests.support.daemon import DaemonProcess, running_daemon
from tests.support.http import assert_openai_error, chat, read_sse, sse_lines
from tests.support.status import load_model, wait_for_stats


@pytest.mark.parametrize("deadline", ["first_byte_timeout", "request_timeout"])
async def test_deadline_before_the_first_byte_gives_504_and_aborts_the_backend(
    state_dir: Path, deadline: str
) -> None:
    config = echo_config(state_dir, "--response-delay", "30", server={deadline: 0.5})
    async with running_daemon(config, admin=True) as (_, client):
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
    async with running_daemon(config, admin=True) as (_, client):
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


# The stream-idle case: tokens TOKEN_GAP apart, IDLE allowed between two. The first token ends
# the first_byte_timeout phase; the gap after it trips the idle deadline, which fires between
# IDLE and IDLE + its slack (IdleDeadline: at most 1/8 of it) after the last chunk, long before
# the next token or any other deadline would end the stream.
IDLE = 0.8
TOKEN_GAP = 3.0


async def test_stream_idle_timeout_ends_a_stalled_stream(
    tmp_path: Path, spawn_daemon: Callable[..., DaemonProcess]
) -> None:
    # The daemon runs as its own process: what is timed is its deadline, not this test's loop.
    config, url = daemon_config(
        tmp_path / "c.toml",
        tmp_path / "state",
        {"echo": {"cmd": echo_cmd("--tokens", "5", "--token-delay", str(TOKEN_GAP))}},
        server={"stream_idle_timeout": IDLE, "first_byte_timeout": 20, "request_timeout": 30},
    )
    daemon = spawn_daemon(config, url)
    port = daemon.load("echo")["port"]
    arrivals: list[tuple[float, str]] = []
    async with httpx.AsyncClient(base_url=url, timeout=30, trust_env=False) as client:
        sent_at = trio.current_time()
        body = chat(stream=True)
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            async for line in sse_lines(response):
                arrivals.append((trio.current_time(), line))
        ended_at = trio.current_time()
        await wait_for_stats(port, "cancelled", 1)
    data = [(at, line.removeprefix("data: ")) for at, line in arrivals if line.startswith("data:")]
    # One token, then the error event as the stream's last: the idle deadline ended it.
    assert len(data) == 2, data
    (token_at, token), (_, last) = data
    assert json.loads(token)["choices"][0]["delta"], token
    error = json.loads(last)["error"]
    assert set(error) == {"message", "type", "code"} and error["code"] == "timeout", error
    assert error["message"] == (
        f"model 'echo' sent nothing for stream_idle_timeout ({IDLE:g}s); "
        "the upstream request was aborted"
    ), error
    # Not before: the idle time counts from the last chunk, which came TOKEN_GAP after the
    # request reached the backend (so after we sent it).
    assert ended_at - sent_at >= TOKEN_GAP + IDLE, ended_at - sent_at
    # Not at another deadline: long before the next token would have come (TOKEN_GAP), and
    # first_byte_timeout and request_timeout are further still.
    assert ended_at - token_at < IDLE + (TOKEN_GAP - IDLE) / 2, ended_at - token_at
