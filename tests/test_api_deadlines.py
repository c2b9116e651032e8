"""Deadlines on the newer APIs: ``first_byte_timeout`` and ``request_timeout`` answer 504 (in
Anthropic's shape on ``/v1/messages``), or end a stream that has begun with an error event (an
``event: error`` on ``/v1/messages``), and the upstream request is aborted: the echo counts it
cancelled, never completed.

The requests of one test run at once, each against its own deadline, so that the test takes
one deadline's time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import trio

from tests.support.config import echo_config
from tests.support.daemon import running_daemon
from tests.support.http import assert_openai_error
from tests.support.status import direct_client, load_model, wait_for_stats

TEXT = [{"role": "user", "content": "take your time"}]
MESSAGES: dict[str, Any] = {"model": "echo", "max_tokens": 1000, "messages": TEXT}
RESPONSES: dict[str, Any] = {"model": "echo", "input": "take your time"}


def assert_anthropic_504(response: httpx.Response, deadline: str) -> None:
    assert response.status_code == 504, response.text
    body = response.json()
    assert body == {
        "type": "error",
        "error": {"type": "api_error", "message": body["error"]["message"]},
    }
    assert deadline in body["error"]["message"], body


def stream_events(response: httpx.Response) -> list[tuple[str | None, dict[str, Any]]]:
    """Each event of a whole event stream: its ``event:`` name (None without one), its data."""
    events: list[tuple[str | None, dict[str, Any]]] = []
    for block in response.text.split("\n\n"):
        lines = block.splitlines()
        data = [line[6:] for line in lines if line.startswith("data: ")]
        if data:
            names = [line[7:] for line in lines if line.startswith("event: ")]
            events.append((names[0] if names else None, json.loads(data[0])))
    return events


async def all_at_once(
    client: httpx.AsyncClient, requests: dict[str, tuple[str, dict[str, Any]]]
) -> dict[str, httpx.Response]:
    """POST every ``(path, body)`` at once; their responses, read whole, by name."""
    answers: dict[str, httpx.Response] = {}

    async def post(name: str, path: str, body: dict[str, Any]) -> None:
        answers[name] = await client.post(path, json=body)

    async with trio.open_nursery() as nursery:
        for name, (path, body) in requests.items():
            nursery.start_soon(post, name, path, body)
    return answers


async def test_first_byte_timeout_is_a_504_in_each_apis_shape(state_dir: Path) -> None:
    # The first token comes after 3 s: past the deadline, streamed or not.
    config = echo_config(state_dir, "--token-delay", "3", server={"first_byte_timeout": 1})
    requests = {
        "messages": ("/v1/messages", MESSAGES),
        "messages-stream": ("/v1/messages", {**MESSAGES, "stream": True}),
        "responses": ("/v1/responses", RESPONSES),
        "responses-stream": ("/v1/responses", {**RESPONSES, "stream": True}),
        "speech": ("/v1/audio/speech", {"model": "echo", "input": "hi"}),
        "completion": ("/completion", {"model": "echo", "prompt": "hi", "stream": True}),
    }
    async with running_daemon(config, admin=True) as (_, client), direct_client() as direct:
        port = (await load_model(client, "echo"))["port"]
        answers = await all_at_once(client, requests)
        for name in ("messages", "messages-stream"):
            assert_anthropic_504(answers[name], "first_byte_timeout")
        for name in ("responses", "responses-stream", "speech", "completion"):
            error = assert_openai_error(answers[name], 504, "timeout")
            assert "first_byte_timeout" in error["message"], (name, error)
        stats = await wait_for_stats(port, "cancelled", len(requests), client=direct)
        assert stats["completed"] == 0, stats


async def test_request_timeout_is_a_504_or_ends_a_begun_stream(state_dir: Path) -> None:
    # 200 tokens 50 ms apart: a stream is well under way when the 1.5 s are up.
    config = echo_config(
        state_dir, "--tokens", "200", "--token-delay", "0.05", server={"request_timeout": 1.5}
    )
    requests = {
        "messages": ("/v1/messages", MESSAGES),
        "messages-stream": ("/v1/messages", {**MESSAGES, "stream": True}),
        "responses": ("/v1/responses", RESPONSES),
        "responses-stream": ("/v1/responses", {**RESPONSES, "stream": True}),
        "completion-stream": ("/completion", {"model": "echo", "prompt": "hi", "stream": True}),
    }
    async with running_daemon(config, admin=True) as (_, client), direct_client() as direct:
        port = (await load_model(client, "echo"))["port"]
        answers = await all_at_once(client, requests)
        # Non-streaming (assembled from a stream): nothing was sent before the deadline.
        assert_anthropic_504(answers["messages"], "request_timeout")
        error = assert_openai_error(answers["responses"], 504, "timeout")
        assert "request_timeout" in error["message"], error

        for name in ("messages-stream", "responses-stream", "completion-stream"):
            assert answers[name].status_code == 200, (name, answers[name].text)
            events = stream_events(answers[name])
            assert len(events) > 5, (name, events)  # the stream had begun
            *_, (event, last) = events
            if name == "messages-stream":
                assert event == "error", events[-3:]
                assert last["type"] == "error" and last["error"]["type"] == "api_error", last
                assert "request_timeout" in last["error"]["message"], last
            else:
                assert event is None, events[-3:]
                assert last["error"]["code"] == "timeout", last
                assert "request_timeout" in last["error"]["message"], last
        stats = await wait_for_stats(port, "cancelled", len(requests), client=direct)
        assert stats["completed"] == 0, stats
