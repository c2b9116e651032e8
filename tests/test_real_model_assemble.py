"""Assembling llama-server's stream gives llama-server's own non-streaming answer.

The same request goes straight to one llama-server (Gemma 3 270M, from ``make real-model``)
twice: as the client sent it, and as ``upstream_body`` turns it into a stream; the assembled
stream must equal the non-streaming answer. ``temperature: 0`` and ``cache_prompt: false`` make
both generations the same. Skipped, with the reason, when the binary or the GGUF is missing
(``TRIOSERVE_LLAMA_SERVER`` and ``TRIOSERVE_GGUF`` point at others).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.real_model import needs_real_model, started_llama, upstream_stream
from trioserve.gateway.assemble import ASSEMBLED_PATHS, Assembled, Assembler

pytestmark = needs_real_model()

SHORT_PROMPT = [{"role": "user", "content": "Say hello in one short sentence."}]
LONG_PROMPT = [{"role": "user", "content": "Count from 1 to 1000, separated by commas."}]
# Deterministic: greedy sampling, and no reuse of the previous request's KV cache.
SAME = {"temperature": 0, "cache_prompt": False}
# Differ between two generations of the same answer, by nature.
_PER_GENERATION = ("id", "created", "timings")


@pytest.fixture
def llama_url(tmp_path: Path) -> Iterator[str]:
    """A llama-server of the test's own, stopped and reaped after the test."""
    log = tmp_path / "llama-server.log"
    with started_llama(log, parallel=2) as url:  # n = 2 generates its choices side by side
        yield url


async def both_ways(url: str, path: str, body: dict[str, Any]) -> tuple[httpx.Response, Assembled]:
    """llama-server's non-streaming answer to ``body``, and the assembly of its stream."""
    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=120) as client:
        whole = await client.post(path, json=body)
        status, content_type, reads = await upstream_stream(client, path, body)
    assembler = Assembler(ASSEMBLED_PATHS[path], status, content_type)
    for read in reads:
        assembler.feed(read)
    return whole, assembler.result()


def same_answer(whole: httpx.Response, assembled: Assembled) -> dict[str, Any]:
    """Asserts the two answers are the same but for what differs per generation."""
    assert (assembled.status, assembled.content_type) == (200, b"application/json")
    assert whole.status_code == 200, whole.text
    expected = whole.json()
    got: dict[str, Any] = json.loads(assembled.body)
    for key in _PER_GENERATION:
        assert key in got and key in expected, key
        del got[key], expected[key]
    assert got == expected
    return got


async def test_chat_answer_is_llama_servers_own(llama_url: str) -> None:
    body = {"messages": SHORT_PROMPT, "max_tokens": 24, **SAME}
    answer = same_answer(*await both_ways(llama_url, "/v1/chat/completions", body))
    assert answer["choices"][0]["message"]["content"]
    assert answer["usage"]["completion_tokens"] > 0


async def test_chat_cut_at_max_tokens(llama_url: str) -> None:
    body = {"messages": LONG_PROMPT, "max_tokens": 40, "ignore_eos": True, **SAME}
    answer = same_answer(*await both_ways(llama_url, "/v1/chat/completions", body))
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 40


async def test_chat_logprobs(llama_url: str) -> None:
    body = {"messages": SHORT_PROMPT, "max_tokens": 12, "logprobs": True, "top_logprobs": 3}
    answer = same_answer(*await both_ways(llama_url, "/v1/chat/completions", {**body, **SAME}))
    content = answer["choices"][0]["logprobs"]["content"]
    assert len(content) == answer["usage"]["completion_tokens"]
    assert all(len(entry["top_logprobs"]) == 3 for entry in content)


async def test_chat_two_choices(llama_url: str) -> None:
    body = {"messages": SHORT_PROMPT, "max_tokens": 12, "n": 2, "logprobs": True, **SAME}
    answer = same_answer(*await both_ways(llama_url, "/v1/chat/completions", body))
    assert [choice["index"] for choice in answer["choices"]] == [0, 1]


async def test_completion_with_logprobs(llama_url: str) -> None:
    body = {"prompt": "The capital of France is", "max_tokens": 16, "logprobs": 2, **SAME}
    answer = same_answer(*await both_ways(llama_url, "/v1/completions", body))
    assert answer["object"] == "text_completion"
    choice = answer["choices"][0]
    assert choice["text"]
    assert len(choice["logprobs"]["content"]) == answer["usage"]["completion_tokens"]


@pytest.mark.parametrize(
    "body",
    [
        # Tools need llama-server's --jinja, which this GGUF cannot have (see the example).
        {"messages": SHORT_PROMPT, "tools": [{"type": "function", "function": {"name": "f"}}]},
        {"messages": [{"role": "user", "content": "hello " * 3000}]},  # over the 2048 a slot has
        {"messages": "not a list"},
    ],
    ids=["tools-without-jinja", "context-exceeded", "invalid"],
)
async def test_an_error_before_the_stream_is_llama_servers_own(
    llama_url: str, body: dict[str, Any]
) -> None:
    whole, assembled = await both_ways(llama_url, "/v1/chat/completions", {**body, **SAME})
    assert 400 <= whole.status_code < 600
    assert (assembled.status, assembled.body) == (whole.status_code, whole.content)
    assert json.loads(assembled.body)["error"]["message"]
