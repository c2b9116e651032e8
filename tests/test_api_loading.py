"""Streaming requests on the newer APIs while their model starts (``--startup-delay``): the
Responses stream carries ``: loading model …`` comments before its first event, as chat's
does, a Messages stream ``event: ping`` instead, and the official SDKs read their streams
through that progress to the right end."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
import trio
from anthropic.types import MessageParam

from tests.support.config import echo_config
from tests.support.daemon import running_daemon
from tests.support.http import read_sse
from trioserve.backends.echo.model import reply_tokens

# The SDKs' stream iterators end without closing their inner async generators (as in
# test_openai_sdk.py). Not a leak of ours.
pytestmark = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning", "ignore::ResourceWarning"
)

TEXT = "hello there"


@pytest.fixture(autouse=True)
def no_anthropic_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


async def test_streams_of_responses_and_messages_get_progress_while_the_model_loads(
    state_dir: Path,
) -> None:
    config = echo_config(state_dir, "--startup-delay", "2")
    responses = {"model": "echo", "input": TEXT, "stream": True}
    said: list[MessageParam] = [{"role": "user", "content": TEXT}]
    messages = {"model": "echo", "max_tokens": 50, "messages": said, "stream": True}
    results: dict[str, Any] = {}
    async with running_daemon(config) as (info, client):

        async def by_hand(path: str, body: dict[str, Any]) -> None:
            async with client.stream("POST", path, json=body) as response:
                assert response.status_code == 200
                results[path] = await read_sse(response)

        async def openai_sdk() -> None:
            sdk = openai.AsyncOpenAI(
                base_url=info.url + "/v1", api_key="unused", max_retries=0, timeout=30
            )
            stream = await sdk.responses.create(model="echo", input=TEXT, stream=True)
            results["deltas"] = [
                event.delta async for event in stream if event.type == "response.output_text.delta"
            ]
            await sdk.close()

        async def anthropic_sdk() -> None:
            async with (
                anthropic.AsyncAnthropic(
                    base_url=info.url, api_key="unused", max_retries=0, timeout=30
                ) as sdk,
                sdk.messages.stream(model="echo", max_tokens=50, messages=said) as stream,
            ):
                results["message"] = await stream.get_final_message()

        # All four wait for the same start.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(by_hand, "/v1/responses", responses)
            nursery.start_soon(by_hand, "/v1/messages", messages)
            nursery.start_soon(openai_sdk)
            nursery.start_soon(anthropic_sdk)
    gc.collect()

    lines: list[str] = results["/v1/responses"]
    loading = [i for i, line in enumerate(lines) if line.startswith(": loading model echo (")]
    assert loading, lines[:5]
    assert loading[-1] < lines.index("event: response.created"), lines[:8]
    assert "event: ping" not in lines  # Anthropic's keep-alive, not OpenAI's
    assert lines[-2] == "event: response.completed", lines[-4:]

    lines = results["/v1/messages"]
    pings = [i for i, line in enumerate(lines) if line == "event: ping"]
    assert pings, lines[:5]
    assert pings[-1] < lines.index("event: message_start"), lines[:8]
    assert not any(line.startswith(":") for line in lines), lines[:8]
    assert lines[-2] == "event: message_stop", lines[-4:]

    expected = reply_tokens(TEXT, 8)
    assert results["deltas"] == expected
    message = results["message"]
    assert message.content[0].text == "".join(expected)
    assert (message.stop_reason, message.usage.output_tokens) == ("end_turn", 8)
