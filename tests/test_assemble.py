"""Assembling a non-streaming answer from the echo backend's live streams
(``trioserve.gateway.assemble``), and the echo backend as the relay's test double.

The oracles are independent of the assembler: the OpenAI SDK's own accumulation of the very
bytes it read (``chat.completions.stream(...).get_final_completion()`` through a transport that
records them), and the echo backend's own non-streaming answer to the same request. The echo
backend runs in-process, on a real loopback socket. Hand-built streams (framing, errors, what
is refused) are in test_assemble_stream.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import httpx2  # the SDK's own copy of httpx
import openai
import pytest
import trio

from tests.support.assembly import as_sdk_sees, assemble, comparable
from tests.support.http import chat
from trioserve.backends.echo import EchoOptions, serve
from trioserve.gateway.assemble import Assembled, Kind, upstream_body

pytestmark = [
    # The SDK leaves its SSE async generators unexhausted when a stream ends at [DONE]; the
    # connection is closed. Known upstream (as in test_real_model.py), not a leak of ours.
    pytest.mark.filterwarnings("ignore:Async generator 'openai\\.:ResourceWarning"),
    pytest.mark.filterwarnings(
        "ignore:Exception ignored in. <async_generator object (SSEDecoder|AsyncStream):"
        "pytest.PytestUnraisableExceptionWarning"
    ),
]

WORDS = "the quick brown fox jumps"
TOOLS = [
    {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "remember", "parameters": {"type": "object"}}},
]


# -- harness ----------------------------------------------------------------------------------


@asynccontextmanager
async def echo_in_process() -> AsyncIterator[str]:
    """An echo backend on a free loopback port; yields its base URL."""
    async with trio.open_nursery() as nursery:
        urls: list[str] = await nursery.start(serve, EchoOptions(port=0))
        yield urls[0]
        nursery.cancel_scope.cancel()


class _Tee(httpx2.AsyncByteStream):
    def __init__(self, stream: httpx2.AsyncByteStream, reads: list[bytes]) -> None:
        self._stream = stream
        self._reads = reads

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            self._reads.append(chunk)
            yield chunk

    async def aclose(self) -> None:
        await self._stream.aclose()


class Recording(httpx2.AsyncBaseTransport):
    """The SDK's real HTTP transport, keeping each response body as read, one entry per read."""

    def __init__(self) -> None:
        self._inner = httpx2.AsyncHTTPTransport()
        self.reads: list[list[bytes]] = []

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await self._inner.handle_async_request(request)
        reads: list[bytes] = []
        self.reads.append(reads)
        assert isinstance(response.stream, httpx2.AsyncByteStream)
        return httpx2.Response(
            response.status_code,
            headers=response.headers,
            stream=_Tee(response.stream, reads),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._inner.aclose()


async def post(url: str, path: str, body: bytes) -> tuple[httpx.Response, list[bytes]]:
    """POST ``body``; the response and its body as the reads that brought it."""
    headers = {"content-type": "application/json"}
    async with (
        httpx.AsyncClient(base_url=url, trust_env=False) as client,
        client.stream("POST", path, content=body, headers=headers) as response,
    ):
        reads = [chunk async for chunk in response.aiter_raw()]
    return response, reads


def completion(**extra: Any) -> dict[str, Any]:
    return {"model": "echo", "prompt": WORDS, **extra}


# -- against the SDK's accumulation -----------------------------------------------------------


async def sdk_stream_and_assembly(**request: Any) -> tuple[dict[str, Any], Assembled]:
    """The SDK's final completion of a streamed chat request, and our assembly of the bytes
    the SDK read."""
    recording = Recording()
    async with (
        echo_in_process() as url,
        openai.AsyncOpenAI(
            base_url=url + "/v1",
            api_key="x",
            max_retries=0,
            http_client=openai.DefaultAsyncHttpxClient(transport=recording, trust_env=False),
        ) as client,
        client.chat.completions.stream(
            model="echo",
            messages=[{"role": "user", "content": WORDS}],
            stream_options={"include_usage": True},
            **request,
        ) as stream,
    ):
        final = await stream.get_final_completion()
    (reads,) = recording.reads
    assert len(reads) > 1  # the stream came in pieces, fed here as they came
    return comparable(final), assemble("chat", reads)


async def test_plain_content_equals_the_sdks_final_completion() -> None:
    sdk, answer = await sdk_stream_and_assembly(max_tokens=7)
    assert as_sdk_sees(answer) == sdk
    assert sdk["choices"][0]["message"]["content"] == "the quick brown fox jumps the quick"
    assert sdk["usage"]["completion_tokens"] == 7


async def test_tool_calls_split_across_many_chunks_equal_the_sdks() -> None:
    sdk, answer = await sdk_stream_and_assembly(tools=TOOLS, max_tokens=6)
    assert as_sdk_sees(answer) == sdk
    calls = sdk["choices"][0]["message"]["tool_calls"]
    assert [call["function"]["name"] for call in calls] == ["lookup", "remember"]
    expected = json.dumps({"text": "the quick brown fox jumps the"})
    assert [call["function"]["arguments"] for call in calls] == [expected, expected]
    assert sdk["choices"][0]["finish_reason"] == "tool_calls"


async def test_logprobs_equal_the_sdks() -> None:
    sdk, answer = await sdk_stream_and_assembly(logprobs=True, top_logprobs=3, max_tokens=5)
    assert as_sdk_sees(answer) == sdk
    content = sdk["choices"][0]["logprobs"]["content"]
    assert [entry["token"] for entry in content] == ["the ", "quick ", "brown ", "fox ", "jumps"]
    assert all(len(entry["top_logprobs"]) == 3 for entry in content)


async def test_several_choices_with_tools_equal_the_sdks() -> None:
    sdk, answer = await sdk_stream_and_assembly(n=3, tools=TOOLS, max_tokens=4)
    assert as_sdk_sees(answer) == sdk
    arguments = [
        json.loads(choice["message"]["tool_calls"][1]["function"]["arguments"])["text"]
        for choice in sdk["choices"]
    ]
    assert arguments == ["the quick brown fox", "quick brown fox jumps", "brown fox jumps the"]


async def test_several_choices_with_logprobs_equal_the_sdks() -> None:
    sdk, answer = await sdk_stream_and_assembly(n=2, logprobs=True, max_tokens=4)
    ours = as_sdk_sees(answer)
    # openai 3.57's accumulation counts the first logprob of a choice that is first seen after
    # the stream's first chunk twice (taken with the choice, then appended again): choice 1's
    # list starts with a duplicate. Our list is the echo backend's own non-streaming one
    # (test_assembly_equals_the_backends_non_streaming_answer[chat-logprobs-n2]).
    duplicated = sdk["choices"][1]["logprobs"]["content"]
    assert duplicated[0] == duplicated[1]
    del duplicated[0]
    assert ours == sdk
    assert [c["message"]["content"] for c in sdk["choices"]] == [
        "the quick brown fox",
        "quick brown fox jumps",
    ]


# A stream as llama-server sends it for a reasoning model: reasoning_content deltas, usage and
# timings in a last chunk of their own, system_fingerprint in every chunk.
# -- against the echo backend's own non-streaming answer ----------------------------------------


@pytest.mark.parametrize(
    ("path", "kind", "request_body"),
    [
        ("/v1/chat/completions", "chat", chat(text=WORDS)),
        (
            "/v1/chat/completions",
            "chat",
            chat(text=WORDS, n=2, tools=TOOLS, parallel_tool_calls=False),
        ),
        ("/v1/chat/completions", "chat", chat(text=WORDS, n=2, logprobs=True, top_logprobs=2)),
        ("/v1/completions", "completion", completion()),
        ("/v1/completions", "completion", completion(n=3, logprobs=2, max_tokens=5)),
        ("/v1/completions", "completion", completion(max_tokens=0)),
    ],
    ids=["chat", "chat-tools-n2", "chat-logprobs-n2", "text", "text-logprobs-n3", "text-empty"],
)
async def test_assembly_equals_the_backends_non_streaming_answer(
    path: str, kind: Kind, request_body: dict[str, Any]
) -> None:
    async with echo_in_process() as url:
        whole, whole_reads = await post(url, path, json.dumps(request_body).encode())
        streamed, reads = await post(url, path, upstream_body(kind, request_body))
    assert streamed.headers["content-type"] == "text/event-stream"
    answer = assemble(kind, reads, streamed)
    assert answer.status == whole.status_code == 200
    expected = json.loads(b"".join(whole_reads))
    got = json.loads(answer.body)
    # Each generation has its own id (and tool call ids made from it) and second.
    assert got.pop("id") != expected.pop("id")
    got.pop("created"), expected.pop("created")
    assert json.dumps(got).replace("echo2", "echo1") == json.dumps(expected)


async def test_completion_logprobs_are_concatenated_in_order() -> None:
    request_body = completion(logprobs=1, max_tokens=4)
    async with echo_in_process() as url:
        streamed, reads = await post(
            url, "/v1/completions", upstream_body("completion", request_body)
        )
    choice = json.loads(assemble("completion", reads, streamed).body)["choices"][0]
    assert choice["text"] == "the quick brown fox"
    assert choice["logprobs"]["tokens"] == ["the ", "quick ", "brown ", "fox"]
    assert choice["logprobs"]["text_offset"] == [0, 4, 10, 16]
    assert len(choice["logprobs"]["token_logprobs"]) == len(choice["logprobs"]["top_logprobs"])


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [500, 503, 400])
async def test_an_error_before_the_stream_is_passed_through_unchanged(code: int) -> None:
    request_body = chat(text=WORDS, echo_error_after=0, echo_error_code=code)
    async with echo_in_process() as url:
        whole, whole_reads = await post(
            url, "/v1/chat/completions", json.dumps(request_body).encode()
        )
        streamed, reads = await post(
            url, "/v1/chat/completions", upstream_body("chat", request_body)
        )
    assert streamed.status_code == code
    answer = assemble("chat", reads, streamed)
    assert (answer.status, answer.body) == (whole.status_code, b"".join(whole_reads))
    assert answer.content_type == b"application/json"


@pytest.mark.parametrize("code", [500, 503, 400])
async def test_an_error_inside_the_stream_becomes_the_non_streaming_error(code: int) -> None:
    request_body = chat(text=WORDS, echo_error_after=3, echo_error_code=code, n=2)
    async with echo_in_process() as url:
        whole, whole_reads = await post(
            url, "/v1/chat/completions", json.dumps(request_body).encode()
        )
        streamed, reads = await post(
            url, "/v1/chat/completions", upstream_body("chat", request_body)
        )
    assert streamed.status_code == 200
    stream = b"".join(reads)
    assert stream.count(b'"delta"') == 6 and b"[DONE]" not in stream
    answer = assemble("chat", reads, streamed)
    assert (answer.status, answer.body) == (whole.status_code, b"".join(whole_reads))
    assert json.loads(answer.body)["error"]["code"] == code == whole.status_code


# -- SSE framing ------------------------------------------------------------------------------


async def rich_stream() -> bytes:
    request_body = chat(text=WORDS, n=2, tools=TOOLS[:1], logprobs=True, max_tokens=3)
    async with echo_in_process() as url:
        _, reads = await post(url, "/v1/chat/completions", upstream_body("chat", request_body))
    return b"".join(reads)


async def test_a_split_at_every_byte_boundary_changes_nothing() -> None:
    stream = await rich_stream()
    whole = assemble("chat", [stream])
    for cut in range(len(stream) + 1):
        assert assemble("chat", [stream[:cut], stream[cut:]]) == whole, cut


# The reasoning stream with raw UTF-8 (2- and 3-byte characters) that reads may split.
# -- the echo backend as the relay's test double ----------------------------------------------


def events_of(stream: bytes) -> list[Any]:
    return [
        json.loads(event[6:]) if event != b"data: [DONE]" else "[DONE]"
        for event in stream.split(b"\n\n")
        if event.startswith(b"data: ")
    ]


async def test_echo_sends_usage_alone_last_only_when_asked() -> None:
    async with echo_in_process() as url:
        _, asked = await post(
            url, "/v1/completions", upstream_body("completion", completion(max_tokens=2))
        )
        plain = json.dumps(completion(max_tokens=2, stream=True)).encode()
        _, not_asked = await post(url, "/v1/completions", plain)
    *_, finish, usage, done = events_of(b"".join(asked))
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 2
    assert finish["choices"][0]["finish_reason"] == "stop" and "usage" not in finish
    assert done == "[DONE]"
    *_, finish, done = events_of(b"".join(not_asked))  # as llama-server without the option
    assert finish["choices"][0]["finish_reason"] == "stop" and finish["usage"]
    assert done == "[DONE]"


async def test_echo_response_delay_holds_a_stream_that_asks_for_usage(
    autojump_clock: trio.abc.Clock,
) -> None:
    # What trioserve sends for a non-streaming request stays as slow as the non-streaming
    # answer. (Virtual time: any jump while waiting only lengthens what is measured.)
    delay = 30.0
    async with trio.open_nursery() as nursery:
        urls: list[str] = await nursery.start(serve, EchoOptions(port=0, response_delay=delay))
        async with httpx.AsyncClient(base_url=urls[0], trust_env=False, timeout=None) as client:
            for body in (
                upstream_body("chat", chat(text=WORDS)),
                json.dumps(chat(text=WORDS)).encode(),
            ):
                start = trio.current_time()
                response = await client.post("/v1/chat/completions", content=body)
                assert response.status_code == 200
                assert trio.current_time() - start >= delay
        nursery.cancel_scope.cancel()


async def test_echo_response_delay_does_not_hold_a_clients_own_stream() -> None:
    async with trio.open_nursery() as nursery:
        urls: list[str] = await nursery.start(serve, EchoOptions(port=0, response_delay=600))
        async with httpx.AsyncClient(base_url=urls[0], trust_env=False) as client:
            with trio.fail_after(20):  # generous for a loaded machine; held, it would be 600 s
                response = await client.post(
                    "/v1/chat/completions", json=chat(text=WORDS, stream=True)
                )
        assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")
        nursery.cancel_scope.cancel()
