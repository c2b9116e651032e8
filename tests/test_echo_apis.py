"""The echo backend's OpenAI Responses and Anthropic Messages APIs, shaped as llama-server
answers them (and as the official SDKs read them). The echo runs as the real child process the
daemon starts; test_echo_apis_native has llama.cpp's own APIs and the timing of them all."""

from __future__ import annotations

import gc
from typing import Any

import anthropic
import openai
import pytest

from tests.support.echo import echo_backend, events, llama_error

# The keys of llama-server's answers (build 11434), in its order: /tmp/llama-samples.
RESPONSE_KEYS = [
    "completed_at",
    "created_at",
    "id",
    "model",
    "object",
    "output",
    "status",
    "usage",
]
MESSAGE_KEYS = [
    "id",
    "type",
    "role",
    "content",
    "model",
    "stop_reason",
    "stop_sequence",
    "usage",
]
RESPONSE_OPENING = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
]
RESPONSE_CLOSING = [
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


async def test_responses_answer_is_what_its_stream_assembles() -> None:
    request = {
        "model": "tiny",
        "instructions": "be brief",
        "input": [
            {"role": "user", "content": "not this"},
            {"role": "assistant", "content": "nor this"},
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "hello big world"}],
            },
        ],
    }
    async with echo_backend("--tokens", "5", "--model-name", "tiny") as echo:
        answer = (await echo.client.post("/v1/responses", json=request)).json()
        assert list(answer) == RESPONSE_KEYS
        assert (answer["object"], answer["status"], answer["model"]) == (
            "response",
            "completed",
            "tiny",
        )
        [message] = answer["output"]
        assert list(message) == ["content", "id", "role", "status", "type"]
        text = "hello big world hello big"
        assert message["content"] == [
            {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
        ]
        # Input tokens: the words of the instructions and of every item.
        usage = {
            "input_tokens": 9,
            "output_tokens": 5,
            "total_tokens": 14,
            "input_tokens_details": {"cached_tokens": 0},
        }
        assert answer["usage"] == usage

        streamed = await echo.client.post("/v1/responses", json={**request, "stream": True})
        assert streamed.headers["content-type"] == "text/event-stream"
        assert "[DONE]" not in streamed.text
        stream = events(streamed.text)
        assert all(name == data["type"] for name, data in stream)  # every event is named
        names = [name for name, _ in stream]
        assert names == [*RESPONSE_OPENING, *["response.output_text.delta"] * 5, *RESPONSE_CLOSING]
        assert (
            "".join(data["delta"] for name, data in stream if name == "response.output_text.delta")
            == text
        )
        completed = stream[-1][1]
        assert completed["response"]["status"] == answer["status"]
        assert completed["response"]["usage"] == answer["usage"]
        assert completed["response"]["output"][0]["content"] == message["content"]
        assert completed["timings"]["predicted_n"] == 5

        short = await echo.client.post("/v1/responses", json={**request, "max_output_tokens": 2})
        assert short.json()["output"][0]["content"][0]["text"] == "hello big"
        assert short.json()["usage"]["output_tokens"] == 2

        counted = await echo.client.post("/v1/responses/input_tokens", json=request)
        assert counted.json() == {"input_tokens": 9, "object": "response.input_tokens"}
        assert await echo.stats() == {"started": 3, "completed": 3, "cancelled": 0}


async def test_responses_refuses_bad_input_as_llama_server() -> None:
    async with echo_backend() as echo:
        missing = await echo.client.post("/v1/responses", json={"model": "echo"})
        assert missing.json() == {
            "error": {
                "code": 400,
                "message": "'input' is required",
                "type": "invalid_request_error",
            }
        }
        for body in ({"input": 5}, {"input": "x", "max_output_tokens": "3"}):
            llama_error(
                await echo.client.post("/v1/responses", json=body), 400, "invalid_request_error"
            )
        not_json = await echo.client.post("/v1/responses", content=b"{nope")
        llama_error(not_json, 400, "invalid_request_error")
        no_input = await echo.client.post("/v1/responses/input_tokens", json={})
        llama_error(no_input, 400, "invalid_request_error")
        assert await echo.stats() == {"started": 0, "completed": 0, "cancelled": 0}


async def test_responses_that_fail_end_as_llama_server_ends_them() -> None:
    async with echo_backend("--tokens", "6") as echo:
        request = {"input": "a b c", "stream": True, "echo_error_after": 2}
        stream = events((await echo.client.post("/v1/responses", json=request)).text)
        names = [name for name, _ in stream]
        assert names == [
            *RESPONSE_OPENING,
            "response.output_text.delta",
            "response.output_text.delta",
            None,
        ]
        assert stream[-1][1] == {
            "error": {
                "code": 500,
                "message": "echo: failed after 2 tokens (echo_error_after)",
                "type": "server_error",
            }
        }
        whole = await echo.client.post(
            "/v1/responses", json={**request, "stream": False, "echo_error_code": 503}
        )
        llama_error(whole, 503, "unavailable_error")
        before_first = await echo.client.post(
            "/v1/responses", json={**request, "echo_error_after": 0}
        )
        llama_error(before_first, 500, "server_error")
        assert await echo.stats() == {"started": 3, "completed": 3, "cancelled": 0}


async def test_messages_answer_is_what_its_stream_assembles() -> None:
    request = {
        "model": "echo",
        "system": [{"type": "text", "text": "be brief"}],
        "messages": [
            {"role": "user", "content": "not this"},
            {"role": "assistant", "content": [{"type": "text", "text": "nor this"}]},
            {"role": "user", "content": [{"type": "text", "text": "hello world"}]},
        ],
    }
    async with echo_backend("--tokens", "3") as echo:
        answer = (await echo.client.post("/v1/messages", json=request)).json()
        assert list(answer) == MESSAGE_KEYS
        assert answer["content"] == [{"type": "text", "text": "hello world hello"}]
        assert (answer["type"], answer["role"], answer["stop_reason"]) == (
            "message",
            "assistant",
            "end_turn",
        )
        usage = {"cache_read_input_tokens": 0, "input_tokens": 8, "output_tokens": 3}
        assert answer["usage"] == usage

        streamed = await echo.client.post("/v1/messages", json={**request, "stream": True})
        assert "[DONE]" not in streamed.text
        stream = events(streamed.text)
        assert all(name == data["type"] for name, data in stream)
        assert [name for name, _ in stream] == [
            "message_start",
            "content_block_start",
            *["content_block_delta"] * 3,
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
        start = stream[0][1]["message"]
        assert start["usage"] == {**usage, "output_tokens": 0}
        assert (start["model"], start["stop_reason"], start["content"]) == ("echo", None, [])
        assert start["id"].startswith("chatcmpl-")  # sic: llama-server's
        text = "".join(
            data["delta"]["text"] for name, data in stream if name == "content_block_delta"
        )
        assert text == answer["content"][0]["text"]
        delta = stream[-2][1]
        assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
        assert delta["usage"] == {"output_tokens": 3}

        cut = (await echo.client.post("/v1/messages", json={**request, "max_tokens": 2})).json()
        assert (cut["stop_reason"], cut["content"][0]["text"]) == ("max_tokens", "hello world")
        cut_stream = events(
            (
                await echo.client.post(
                    "/v1/messages", json={**request, "max_tokens": 2, "stream": True}
                )
            ).text
        )
        assert cut_stream[-2][1]["delta"]["stop_reason"] == "max_tokens"

        counted = await echo.client.post("/v1/messages/count_tokens", json=request)
        assert counted.json() == {"input_tokens": 8}
        assert await echo.stats() == {"started": 4, "completed": 4, "cancelled": 0}


async def test_messages_refusals_and_failures() -> None:
    async with echo_backend("--tokens", "4") as echo:
        bad_limit = await echo.client.post(
            "/v1/messages",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": "2"},
        )
        # llama-server's own words (messages-error.json).
        assert bad_limit.json() == {
            "error": {
                "code": 400,
                "message": "Field 'max_tokens': type must be number, but is string",
                "type": "invalid_request_error",
            }
        }
        no_messages = await echo.client.post("/v1/messages", json={"max_tokens": 2})
        llama_error(no_messages, 400, "invalid_request_error")
        llama_error(
            await echo.client.post("/v1/messages/count_tokens", json={}),
            400,
            "invalid_request_error",
        )

        request = {
            "messages": [{"role": "user", "content": "a b"}],
            "stream": True,
            "echo_error_after": 1,
        }
        stream = events((await echo.client.post("/v1/messages", json=request)).text)
        assert [name for name, _ in stream] == [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "error",
        ]
        message = "echo: failed after 1 tokens (echo_error_after)"
        assert stream[-1][1] == {
            "type": "error",
            "error": {"type": "api_error", "message": message},
        }
        overloaded = events(
            (await echo.client.post("/v1/messages", json={**request, "echo_error_code": 529})).text
        )
        assert overloaded[-1][1]["error"]["type"] == "overloaded_error"
        whole = await echo.client.post("/v1/messages", json={**request, "stream": False})
        assert llama_error(whole, 500, "server_error") == message


# The SDKs' stream iterators leave inner async generators to the garbage collector; under trio
# that is reported when they are collected. Not a leak of ours.
@pytest.mark.filterwarnings("ignore:Async generator:ResourceWarning")
async def test_official_sdks_understand_responses_and_messages() -> None:
    async with echo_backend("--tokens", "4") as echo:
        base_url = str(echo.client.base_url)
        async with openai.AsyncOpenAI(
            base_url=base_url + "/v1", api_key="unused", max_retries=0
        ) as ai:
            answer = await ai.responses.create(model="echo", input="hello world")
            assert answer.output_text == "hello world hello world"
            assert answer.usage is not None and answer.usage.output_tokens == 4
            stream = await ai.responses.create(model="echo", input="hey you", stream=True)
            async with stream:
                deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
            assert "".join(deltas) == "hey you hey you"
            with pytest.raises(openai.APIError, match="echo_error_after"):
                failing = await ai.responses.create(
                    model="echo", input="x", stream=True, extra_body={"echo_error_after": 1}
                )
                async with failing:
                    async for _ in failing:
                        pass
        async with anthropic.AsyncAnthropic(
            base_url=base_url, api_key="unused", max_retries=0
        ) as claude:
            messages: Any = [{"role": "user", "content": "hi there"}]
            reply = await claude.messages.create(model="echo", max_tokens=3, messages=messages)
            assert reply.content[0].type == "text" and reply.content[0].text == "hi there hi"
            assert reply.stop_reason == "max_tokens"
            async with claude.messages.stream(
                model="echo", max_tokens=10, messages=messages
            ) as text:
                parts = [part async for part in text.text_stream]
                final = await text.get_final_message()
            assert "".join(parts) == "hi there hi there"
            assert (final.stop_reason, final.usage.output_tokens) == ("end_turn", 4)
            counted = await claude.messages.count_tokens(model="echo", messages=messages)
            assert counted.input_tokens == 2
            with pytest.raises(anthropic.APIStatusError, match="echo_error_after"):
                async with claude.messages.stream(
                    model="echo",
                    max_tokens=5,
                    messages=messages,
                    extra_body={"echo_error_after": 1},
                ) as text:
                    async for _ in text.text_stream:
                        pass
        gc.collect()
