"""The echo backend, run as the real child process the gateway and the benchmarks start."""

from __future__ import annotations

import gc
import json
import signal
from collections.abc import AsyncIterator
from functools import partial

import httpx
import openai
import pytest
import trio

from tests.support.echo import echo_backend
from tests.support.http import assert_openai_error, chat, sse_lines
from trioserve.backends.echo import EchoOptions, embed, reply_tokens, serve


async def sse_data(response: httpx.Response) -> AsyncIterator[str]:
    """The ``data:`` payloads of the echo backend's event stream as they arrive (it sends
    nothing else)."""
    async for line in sse_lines(response):
        assert line.startswith("data: "), line
        yield line.removeprefix("data: ")


def test_reply_cycles_the_input_words() -> None:
    assert "".join(reply_tokens("hello world", 3)) == "hello world hello"
    assert reply_tokens("", 2) == ["echo ", "echo"]
    assert reply_tokens("x", 0) == []


async def test_health_is_ok() -> None:
    async with echo_backend() as echo:
        response = await echo.client.get("/health")
        assert (response.status_code, response.json()) == (200, {"status": "ok"})
        models = (await echo.client.get("/v1/models")).json()
        assert models["object"] == "list"
        assert [model["id"] for model in models["data"]] == ["echo"]


async def test_startup_delay_answers_loading_then_ok() -> None:
    async with echo_backend("--startup-delay", "1", wait_healthy=False) as echo:
        first = await echo.first_answer()
        assert (first.status_code, first.json()) == (503, {"status": "loading"})
        loading = await echo.client.post("/v1/chat/completions", json=chat(text="hi"))
        assert_openai_error(loading, 503, "model_loading")
        await echo.wait_healthy()
        ready = await echo.client.post("/v1/chat/completions", json=chat(text="hi"))
        assert ready.status_code == 200


async def test_chat_reply_echoes_the_last_user_message() -> None:
    async with echo_backend("--tokens", "3", "--model-name", "tiny") as echo:
        body = {
            "model": "tiny",
            "messages": [
                {"role": "user", "content": "not this"},
                {"role": "assistant", "content": "nor this"},
                {"role": "user", "content": "hello world"},
            ],
        }
        answer = (await echo.client.post("/v1/chat/completions", json=body)).json()
        assert answer["object"] == "chat.completion"
        assert answer["model"] == "tiny"
        assert answer["choices"][0]["message"] == {
            "role": "assistant",
            "content": "hello world hello",
        }
        assert answer["choices"][0]["finish_reason"] == "stop"
        assert answer["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
        assert await echo.stats() == {"started": 1, "completed": 1, "cancelled": 0}


async def test_max_tokens_caps_the_reply() -> None:
    async with echo_backend("--tokens", "8") as echo:
        response = await echo.client.post(
            "/v1/chat/completions", json=chat(text="a b", max_tokens=3)
        )
        assert response.json()["choices"][0]["message"]["content"] == "a b a"


async def test_completions_echo_the_prompt() -> None:
    async with echo_backend("--tokens", "4") as echo:
        response = await echo.client.post("/v1/completions", json={"prompt": "one two three"})
        answer = response.json()
        assert answer["object"] == "text_completion"
        assert answer["choices"][0]["text"] == "one two three one"
        assert answer["usage"]["completion_tokens"] == 4


async def test_stream_sends_each_token_as_it_is_produced() -> None:
    tokens, delay = 10, 0.2
    async with echo_backend("--tokens", str(tokens), "--token-delay", str(delay)) as echo:
        sent_at = trio.current_time()
        first_chunk_after = None
        data: list[str] = []
        request = chat(text="hello world", stream=True)
        async with echo.client.stream("POST", "/v1/chat/completions", json=request) as response:
            assert response.headers["content-type"] == "text/event-stream"
            async for item in sse_data(response):
                if first_chunk_after is None:
                    first_chunk_after = trio.current_time() - sent_at
                data.append(item)
        # The whole answer takes tokens * delay = 2 s; the first token must not wait for it.
        assert first_chunk_after is not None
        assert first_chunk_after < tokens * delay / 2
        assert data[-1] == "[DONE]"
        chunks = [json.loads(item) for item in data[:-1]]
        assert len(chunks) == tokens + 1
        assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
        text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
        assert text == "".join(reply_tokens("hello world", tokens))
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * tokens + ["stop"]
        assert await echo.stats() == {"started": 1, "completed": 1, "cancelled": 0}


async def test_completions_stream() -> None:
    async with echo_backend("--tokens", "3") as echo:
        request = {"prompt": "x y", "stream": True}
        async with echo.client.stream("POST", "/v1/completions", json=request) as response:
            data = [item async for item in sse_data(response)]
        assert data[-1] == "[DONE]"
        chunks = [json.loads(item) for item in data[:-1]]
        assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == "x y x"
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


# openai's AsyncStream stops reading its event generator at [DONE] without closing it, and trio
# warns when such a generator is garbage collected. That is openai's doing, not the server's; the
# warning is ignored here only, and gc.collect() makes it happen inside this test, not a later one.
@pytest.mark.filterwarnings("ignore:Async generator:ResourceWarning")
async def test_official_openai_client_understands_the_answers() -> None:
    async with echo_backend("--tokens", "2") as echo:
        base_url = str(echo.client.base_url.join("/v1"))
        async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0) as ai:
            answer = await ai.chat.completions.create(
                model="echo", messages=chat(text="hi")["messages"]
            )
            assert answer.choices[0].message.content == "hi hi"
            stream = await ai.chat.completions.create(
                model="echo", messages=chat(text="hey")["messages"], stream=True
            )
            async with stream:
                parts = [chunk.choices[0].delta.content or "" async for chunk in stream]
            del stream
            gc.collect()
            assert "".join(parts) == "hey hey"


async def test_embeddings_are_deterministic() -> None:
    async with echo_backend() as echo:
        one = (await echo.client.post("/v1/embeddings", json={"input": "same"})).json()
        again = (await echo.client.post("/v1/embeddings", json={"input": ["same", "other"]})).json()
        assert one["object"] == "list"
        vector = one["data"][0]["embedding"]
        assert len(vector) == 8
        assert [item["index"] for item in again["data"]] == [0, 1]
        assert again["data"][0]["embedding"] == vector
        assert again["data"][1]["embedding"] != vector
        # Computed in this process too: the vector does not depend on a per-process hash seed.
        assert vector == embed("same")


async def test_bad_json_is_a_400_and_unknown_path_a_404() -> None:
    async with echo_backend() as echo:
        bad = await echo.client.post(
            "/v1/chat/completions",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert_openai_error(bad, 400, "invalid_json")
        not_an_object = await echo.client.post("/v1/completions", json=[1, 2])
        assert_openai_error(not_an_object, 400, "invalid_json")
        assert_openai_error(await echo.client.get("/v1/nothing-here"), 404, "not_found")
        assert await echo.stats() == {"started": 0, "completed": 0, "cancelled": 0}


async def test_crash_after_kills_the_process_mid_stream() -> None:
    async with echo_backend("--tokens", "10", "--crash-after", "3") as echo:
        data: list[str] = []
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            request = chat(text="boom", stream=True)
            async with echo.client.stream("POST", "/v1/chat/completions", json=request) as response:
                async for item in sse_data(response):
                    data.append(item)
        assert len(data) == 3
        with trio.fail_after(5):
            assert await echo.process.wait() == 1


async def test_client_leaving_mid_stream_cancels_the_generation() -> None:
    # 1000 tokens at 10 ms each: 10 s, far longer than CANCEL_TIMEOUT.
    async with echo_backend("--tokens", "1000", "--token-delay", "0.01") as echo:
        request = chat(text="bye", stream=True)
        received = 0
        # Cancelling rather than breaking out of the loop: httpx's nested async generators are
        # then finished by the exception instead of being left to the garbage collector.
        with trio.CancelScope() as reading:
            async with echo.client.stream("POST", "/v1/chat/completions", json=request) as response:
                async for _ in sse_data(response):
                    received += 1
                    if received == 3:
                        reading.cancel()
        assert received == 3
        # Closing a response whose body is unread closes its connection.
        stats = await echo.wait_stats("cancelled", 1)
        assert stats == {"started": 1, "completed": 0, "cancelled": 1}


async def test_client_leaving_a_slow_non_streaming_request_cancels_it() -> None:
    # 100 tokens at 0.1 s each: the answer would come after 10 s.
    async with echo_backend("--tokens", "100", "--token-delay", "0.1") as echo:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(echo.client.post, "/v1/chat/completions", json=chat(text="slow"))
            )
            await echo.wait_stats("started", 1)
            nursery.cancel_scope.cancel()  # the request's connection is closed
        stats = await echo.wait_stats("cancelled", 1)
        assert stats == {"started": 1, "completed": 0, "cancelled": 1}


async def test_client_leaving_during_response_delay_cancels_it() -> None:
    async with echo_backend("--response-delay", "30") as echo:
        with trio.move_on_after(0.3):
            await echo.client.post("/v1/completions", json={"prompt": "slow"})
            pytest.fail("the answer came before --response-delay")
        stats = await echo.wait_stats("cancelled", 1)
        assert stats == {"started": 1, "completed": 0, "cancelled": 1}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signal_shuts_down_cleanly_with_exit_code_0(signum: signal.Signals) -> None:
    async with echo_backend() as echo:
        # The client keeps an idle keep-alive connection open; shutdown must not wait for it.
        assert (await echo.client.get("/health")).status_code == 200
        echo.process.send_signal(signum)
        with trio.fail_after(2):
            assert await echo.process.wait() == 0


async def test_serves_in_process_on_a_port_chosen_by_the_kernel() -> None:
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve, EchoOptions(port=0, tokens=2))
        async with httpx.AsyncClient(base_url=binds[0]) as client:
            response = await client.post("/v1/completions", json={"prompt": "in process"})
            assert response.json()["choices"][0]["text"] == "in process"
        nursery.cancel_scope.cancel()
