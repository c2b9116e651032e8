"""Assembling llama-server's Responses and Messages streams gives llama-server's own
non-streaming answers, and for Messages what the ``anthropic`` SDK makes of the same bytes.

The same request goes straight to one llama-server (Gemma 3 270M, from ``make real-model``)
twice: as the client sent it, and as ``upstream_body`` turns it into a stream, whose raw bytes
are kept: they are fed to the assembler, to ``StreamUsage`` and to the SDK (through its HTTP
client's mock transport). ``temperature: 0`` makes both generations the same; a first request
of the same prompt leaves the prompt cache as both find it (the cached tokens are part of the
usage). Skipped, with the reason, when the binary or the GGUF is missing
(``TRIOSERVE_LLAMA_SERVER`` and ``TRIOSERVE_GGUF`` point at others).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from anthropic.types import Message

from tests.support.assembly import anthropic_final_message
from tests.support.real_model import needs_real_model, started_llama, upstream_stream
from trioserve.gateway.assemble import ASSEMBLED_PATHS, Assembled, Assembler, upstream_body
from trioserve.gateway.usage import StreamUsage, usage_in_body

pytestmark = needs_real_model()

PROMPT = "Write one short sentence about coffee."
LONG = "hello " * 3000  # over the 2048 tokens a slot has


@pytest.fixture
def llama_url(tmp_path: Path) -> Iterator[str]:
    """A llama-server of the test's own, stopped and reaped after the test."""
    with started_llama(tmp_path / "llama-server.log") as url:
        yield url


class Both:
    """llama-server's non-streaming answer to a request, and its stream of the same one."""

    def __init__(self, whole: httpx.Response, stream: bytes, reads: list[bytes], path: str):
        self.whole = whole
        self.stream = stream
        self.kind = ASSEMBLED_PATHS[path]
        self.reads = reads

    def assembled(self, status: int = 200, content_type: str = "text/event-stream") -> Assembled:
        assembler = Assembler(self.kind, status, content_type)
        for read in self.reads:
            assembler.feed(read)
        return assembler.result()


async def both_ways(url: str, path: str, body: dict[str, Any]) -> tuple[Both, Assembled]:
    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=120) as client:
        await client.post(path, json=body)  # the prompt cache as the two others find it
        whole = await client.post(path, json=body)
        status, content_type, reads = await upstream_stream(client, path, body)
    both = Both(whole, b"".join(reads), reads, path)
    return both, both.assembled(status, content_type)


def same_usage(both: Both, assembled: Assembled) -> None:
    """The usage counted for the stream (as relayed to a streaming client, and as assembled)
    is the non-streaming answer's."""
    expected = usage_in_body(both.whole.content)
    assert expected is not None and expected[1] > 0
    finder = StreamUsage(both.kind)
    for read in both.reads:
        finder.feed(read)
    assert finder.whole
    assert finder.usage() == finder.counted() == expected
    assert usage_in_body(assembled.body) == expected


def sdk_final_message(stream: bytes) -> dict[str, Any]:
    """The anthropic SDK's ``get_final_message()`` of ``stream``, as JSON."""
    return anthropic_final_message(stream).model_dump(mode="json")


async def test_responses_answer_is_llama_servers_own(llama_url: str) -> None:
    body = {"input": PROMPT, "max_output_tokens": 16, "temperature": 0}
    both, assembled = await both_ways(llama_url, "/v1/responses", body)
    assert (assembled.status, assembled.content_type) == (200, b"application/json")
    assert both.whole.status_code == 200, both.whole.text
    got, expected = json.loads(assembled.body), both.whole.json()
    for answer in (got, expected):
        # Each generation has its own ids and second.
        assert answer.pop("id").startswith("resp_")
        for item in answer["output"]:
            assert item.pop("id")
        assert answer.pop("created_at") <= answer.pop("completed_at")
    assert got == expected
    assert got["status"] == "completed" and got["output"][0]["content"][0]["text"]
    assert got["usage"]["output_tokens"] == 16
    same_usage(both, assembled)


@pytest.mark.parametrize("stop", [False, True], ids=["max-tokens", "stop-sequence"])
async def test_messages_answer_is_llama_servers_own_and_the_sdks(
    llama_url: str, stop: bool
) -> None:
    body: dict[str, Any] = {
        "model": "gemma-3-270m",
        "max_tokens": 16,
        "temperature": 0,
        "messages": [{"role": "user", "content": PROMPT}],
    }
    if stop:
        # A word from the middle of the answer without one.
        async with httpx.AsyncClient(base_url=llama_url, trust_env=False, timeout=120) as client:
            text = (await client.post("/v1/messages", json=body)).json()["content"][0]["text"]
        words = text.split()
        assert len(words) >= 3, text
        body["stop_sequences"] = [words[len(words) // 2]]
    both, assembled = await both_ways(llama_url, "/v1/messages", body)
    assert (assembled.status, assembled.content_type) == (200, b"application/json")
    assert both.whole.status_code == 200, both.whole.text
    got, expected = json.loads(assembled.body), both.whole.json()
    assert got.pop("id") != expected.pop("id")
    assert got == expected
    assert list(got) == list(expected) and list(got["usage"]) == list(expected["usage"])
    if stop:
        assert got["stop_sequence"] == body["stop_sequences"][0]
    else:
        assert (got["stop_reason"], got["usage"]["output_tokens"]) == ("max_tokens", 16)
    assert Message.model_validate_json(assembled.body).model_dump(mode="json") == sdk_final_message(
        both.stream
    )
    same_usage(both, assembled)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/responses", {"input": LONG, "max_output_tokens": 4}),
        ("/v1/messages", {"max_tokens": 4, "messages": [{"role": "user", "content": LONG}]}),
        ("/v1/messages", {"max_tokens": "4", "messages": []}),
    ],
    ids=["responses-context-exceeded", "messages-context-exceeded", "messages-invalid"],
)
async def test_an_error_before_the_stream_is_llama_servers_own(
    llama_url: str, path: str, body: dict[str, Any]
) -> None:
    async with httpx.AsyncClient(base_url=llama_url, trust_env=False, timeout=120) as client:
        whole = await client.post(path, json=body)
        streamed = await client.post(
            path,
            content=upstream_body(ASSEMBLED_PATHS[path], body),
            headers={"content-type": "application/json"},
        )
    assert 400 <= whole.status_code < 600
    both = Both(whole, streamed.content, [streamed.content], path)
    assembled = both.assembled(streamed.status_code, streamed.headers["content-type"])
    assert (assembled.status, assembled.body) == (whole.status_code, whole.content)
    assert json.loads(assembled.body)["error"]["message"]
