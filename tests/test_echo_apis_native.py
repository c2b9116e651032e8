"""The echo backend's llama.cpp APIs, /completion and /infill, shaped as llama-server answers
them; and every generating API timed and counted as chat is (--token-delay, --response-delay,
--crash-after, the client leaving, /stats and /metrics). The echo runs as the real child
process the daemon starts."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio

from tests.support.echo import echo_backend, events, llama_error

# The keys of llama-server's /completion answer (build 11434), in its order.
COMPLETION_KEYS = [
    "index",
    "content",
    "tokens",
    "id_slot",
    "stop",
    "model",
    "tokens_predicted",
    "tokens_evaluated",
    "generation_settings",
    "prompt",
    "has_new_line",
    "truncated",
    "stop_type",
    "stopping_word",
    "tokens_cached",
    "timings",
]

# One request of each generating API, streamed or not, for the tests of timing and counting.
GENERATING: dict[str, tuple[str, dict[str, Any]]] = {
    "responses": ("/v1/responses", {"input": "hello world"}),
    "messages": ("/v1/messages", {"messages": [{"role": "user", "content": "hello world"}]}),
    "completion": ("/completion", {"prompt": "hello world"}),
    "infill": ("/infill", {"input_prefix": "hello", "input_suffix": "world"}),
}


async def test_native_completion_and_infill() -> None:
    async with echo_backend("--tokens", "4") as echo:
        answer = (
            await echo.client.post("/completion", json={"prompt": "Say hi", "n_predict": 3})
        ).json()
        assert list(answer) == COMPLETION_KEYS
        assert (answer["content"], answer["stop"], answer["stop_type"]) == (
            "Say hi Say",
            True,
            "limit",
        )
        assert (answer["tokens_predicted"], answer["tokens_evaluated"], answer["tokens"]) == (
            3,
            2,
            [],
        )
        whole = (await echo.client.post("/completion", json={"prompt": "Say hi"})).json()
        assert (whole["content"], whole["stop_type"]) == ("Say hi Say hi", "eos")

        streamed = await echo.client.post("/completion", json={"prompt": "Say hi", "stream": True})
        assert "[DONE]" not in streamed.text
        stream = events(streamed.text)
        assert all(name is None for name, _ in stream)
        chunks, last = [data for _, data in stream[:-1]], stream[-1][1]
        assert [chunk["stop"] for chunk in chunks] == [False] * 4
        assert "".join(chunk["content"] for chunk in chunks) == whole["content"]
        for chunk in chunks:  # each chunk's token ids are its text
            detokenized = await echo.client.post("/detokenize", json={"tokens": chunk["tokens"]})
            assert detokenized.json() == {"content": chunk["content"]}
        assert list(last) == COMPLETION_KEYS
        assert (last["stop"], last["content"], last["timings"]["predicted_n"]) == (True, "", 4)

        ids = (await echo.client.post("/tokenize", json={"content": "Say hi"})).json()["tokens"]
        by_ids = (await echo.client.post("/completion", json={"prompt": ids})).json()
        assert by_ids["content"] == whole["content"]
        alias = await echo.client.post("/completions", json={"prompt": "Say hi"})
        assert alias.json()["content"] == whole["content"]

        failing = {"prompt": "x", "stream": True, "echo_error_after": 2}
        stream = events((await echo.client.post("/completion", json=failing)).text)
        assert len(stream) == 3 and stream[-1][1]["error"]["code"] == 500

        infill = {"input_prefix": "def f(", "input_suffix": "):", "prompt": "x"}
        filled = (await echo.client.post("/infill", json=infill)).json()
        assert list(filled) == COMPLETION_KEYS
        assert filled["content"] == "def f( x ):"
        no_suffix = await echo.client.post("/infill", json={"input_prefix": "a"})
        assert llama_error(no_suffix, 400, "invalid_request_error") == '"input_suffix" is required'
        llama_error(await echo.client.post("/completion", json={}), 400, "invalid_request_error")


@pytest.mark.parametrize("api", GENERATING)
async def test_token_delay_paces_each_stream(api: str) -> None:
    path, body = GENERATING[api]
    tokens, delay = 6, 0.2
    async with echo_backend("--tokens", str(tokens), "--token-delay", str(delay)) as echo:
        sent_at = trio.current_time()
        arrivals: list[float] = []
        async with echo.client.stream("POST", path, json={**body, "stream": True}) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    arrivals.append(trio.current_time() - sent_at)
        # The whole stream takes tokens * delay = 1.2 s; the first token must not wait for it.
        assert arrivals[0] < tokens * delay / 2
        assert arrivals[-1] >= (tokens - 1) * delay
        assert await echo.stats() == {"started": 1, "completed": 1, "cancelled": 0}


@pytest.mark.parametrize("api", GENERATING)
async def test_client_leaving_mid_stream_cancels_the_generation(api: str) -> None:
    path, body = GENERATING[api]
    # 1000 tokens at 10 ms each: 10 s, far longer than CANCEL_TIMEOUT.
    async with echo_backend("--tokens", "1000", "--token-delay", "0.01") as echo:
        received = 0
        with trio.CancelScope() as reading:
            async with echo.client.stream("POST", path, json={**body, "stream": True}) as response:
                async for line in response.aiter_lines():
                    received += line.startswith("data: ")
                    if received == 3:
                        reading.cancel()
        stats = await echo.wait_stats("cancelled", 1)
        assert stats == {"started": 1, "completed": 0, "cancelled": 1}


@pytest.mark.parametrize("api", [*GENERATING, "speech"])
async def test_response_delay_holds_each_whole_answer(api: str) -> None:
    path, body = GENERATING.get(api, ("/v1/audio/speech", {"input": "slow"}))
    async with echo_backend("--response-delay", "30") as echo:
        with trio.move_on_after(0.5):
            await echo.client.post(path, json=body)
            pytest.fail("the answer came before --response-delay")
        stats = await echo.wait_stats("cancelled", 1)
        assert stats == {"started": 1, "completed": 0, "cancelled": 1}


async def test_crash_after_kills_the_process_in_a_messages_stream() -> None:
    async with echo_backend("--tokens", "10", "--crash-after", "3") as echo:
        path, body = GENERATING["messages"]
        deltas = 0
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            async with echo.client.stream("POST", path, json={**body, "stream": True}) as response:
                async for line in response.aiter_lines():
                    deltas += line == "event: content_block_delta"
        assert deltas == 3
        with trio.fail_after(5):
            assert await echo.process.wait() == 1


async def test_generations_of_every_api_are_counted_in_stats_and_metrics() -> None:
    async with echo_backend("--tokens", "3") as echo:
        for path, body in GENERATING.values():
            assert (await echo.client.post(path, json=body)).status_code == 200
        speech = await echo.client.post("/v1/audio/speech", json={"input": "hi"})
        assert speech.status_code == 200
        assert await echo.stats() == {"started": 5, "completed": 5, "cancelled": 0}
        metrics = (await echo.client.get("/metrics")).text
        # 3 tokens for each text API, a chunk a token for speech (8).
        assert "\nllamacpp:tokens_predicted_total 20\n" in metrics
