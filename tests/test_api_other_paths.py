"""The other paths the daemon relays, over plain HTTP: rerank on its three names, speech's
binary answer streamed through as the model speaks it, llama.cpp's own endpoints streamed and
not, and ``/upstream/{model}/…`` reaching the model server's live ``/slots``, ``/props`` and
``/metrics``. The oracle is the echo's own answer to the same request, asked of it directly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import trio

from tests.support.config import echo_config
from tests.support.daemon import running_daemon
from tests.support.http import RawConnection, assert_openai_error, raw_post
from tests.support.status import backend_stats, direct_client, load_model, wait_for_stats
from trioserve.backends.echo.speech import CHUNKS, speech_audio


async def echo_answer(direct: httpx.AsyncClient, port: int, path: str, body: Any) -> Any:
    """What the echo itself answers to ``body`` on ``path``, as JSON."""
    response = await direct.post(f"http://127.0.0.1:{port}{path}", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def events(text: str) -> list[dict[str, Any]]:
    """The JSON of each ``data:`` line of an event stream."""
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


async def test_rerank_on_its_three_paths_is_the_models_answer(state_dir: Path) -> None:
    body = {
        "model": "echo",
        "query": "red fox",
        "documents": ["a red car", "the quick red fox", "blue sky"],
    }
    async with running_daemon(echo_config(state_dir), admin=True) as (_, client):
        port = (await load_model(client, "echo"))["port"]
        async with direct_client() as direct:
            expected = await echo_answer(direct, port, "/v1/rerank", body)
        assert [result["index"] for result in expected["results"]] == [1, 0, 2]
        for path in ("/v1/rerank", "/v1/reranking", "/rerank"):
            answer = await client.post(path, json=body)
            assert answer.status_code == 200, (path, answer.text)
            assert answer.json() == expected, path
            unknown = await client.post(path, json={**body, "model": "nope"})
            assert_openai_error(unknown, 404, "model_not_found")


async def test_speech_audio_is_streamed_through_as_it_comes(state_dir: Path) -> None:
    text = "hello speech"
    # The echo speaks its audio in CHUNKS pieces 0.2 s apart: 1.6 s in all.
    config = echo_config(state_dir, "--token-delay", "0.2")
    async with running_daemon(config, admin=True) as (_, client), direct_client() as direct:
        port = (await load_model(client, "echo"))["port"]
        body = {"model": "echo", "input": text, "voice": "alloy"}
        pieces: list[bytes] = []
        async with client.stream("POST", "/v1/audio/speech", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "audio/wav"
            async for piece in response.aiter_raw():
                if not pieces:
                    # The first bytes are here while the echo still speaks the rest.
                    stats = await backend_stats(port, direct)
                    assert (stats["started"], stats["completed"]) == (1, 0), stats
                pieces.append(piece)
        assert b"".join(pieces) == speech_audio(text)
        assert 1 < len(pieces) <= CHUNKS
        # (Counted once the echo's last send returned: maybe a moment after the client read it.)
        await wait_for_stats(port, "completed", 1, client=direct)


async def test_llama_cpps_own_endpoints_answer_as_the_model_does(state_dir: Path) -> None:
    completion = {"model": "echo", "prompt": "one two", "n_predict": 4}
    infill = {"model": "echo", "input_prefix": "def f(", "input_suffix": "):", "prompt": "x"}
    async with running_daemon(echo_config(state_dir), admin=True) as (_, client):
        port = (await load_model(client, "echo"))["port"]
        async with direct_client() as direct:
            for path, body in (("/completion", completion), ("/infill", infill)):
                expected = await echo_answer(direct, port, path, body)
                whole = await client.post(path, json=body)
                assert whole.status_code == 200, whole.text
                assert whole.json() == expected, path
                streamed = await client.post(path, json={**body, "stream": True})
                assert streamed.status_code == 200, streamed.text
                assert streamed.headers["content-type"].startswith("text/event-stream")
                chunks = events(streamed.text)
                assert len(chunks) > 2, streamed.text  # one per token, and the last
                assert "".join(chunk["content"] for chunk in chunks) == expected["content"]
                assert [chunk["stop"] for chunk in chunks][-2:] == [False, True], path
                assert "[DONE]" not in streamed.text

            tokens = await client.post("/tokenize", json={"model": "echo", "content": "hi you"})
            assert tokens.status_code == 200, tokens.text
            assert tokens.json() == await echo_answer(
                direct, port, "/tokenize", {"content": "hi you"}
            )
            ids = tokens.json()["tokens"]
            words = await client.post("/detokenize", json={"model": "echo", "tokens": ids})
            assert words.json() == {"content": "hi you"}
            messages = [{"role": "user", "content": "hi"}]
            template = await client.post(
                "/apply-template", json={"model": "echo", "messages": messages}
            )
            assert template.json() == {
                "prompt": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
            }
        for path in ("/completion", "/infill", "/tokenize", "/detokenize", "/apply-template"):
            unknown = await client.post(path, json={"model": "nope"})
            assert_openai_error(unknown, 404, "model_not_found")


async def test_upstream_shows_the_model_servers_own_live_state(state_dir: Path) -> None:
    """``/upstream/echo/…`` reaches the running echo itself: while one of its generations
    runs, its slots, props and metrics say so."""
    config = echo_config(state_dir, "--tokens", "200", "--token-delay", "0.05")
    async with running_daemon(config, admin=True) as (info, client):
        await load_model(client, "echo")
        idle = await client.get("/upstream/echo/slots")
        assert idle.status_code == 200, idle.text
        assert [slot["is_processing"] for slot in idle.json()] == [False] * 4
        async with await RawConnection.open(info.url) as generating:
            body = {"model": "echo", "prompt": "busy", "stream": True}
            assert await generating.send(raw_post(body, path="/completion"))
            await generating.read(lambda received: b"data: " in received)
            slots = await client.get("/upstream/echo/slots")
            assert [slot["is_processing"] for slot in slots.json()] == [True, False, False, False]
            busy = await client.get("/upstream/echo/slots?fail_on_no_slot=1")
            assert busy.status_code == 200  # a slot is still free
            props = await client.get("/upstream/echo/props")
            assert props.json()["total_slots"] == 4
            assert props.json()["chat_template"].startswith("{%- for message in messages")
            metrics = await client.get("/upstream/echo/metrics")
            assert metrics.status_code == 200
            assert metrics.headers["content-type"].startswith("text/plain")
            assert "llamacpp:requests_processing 1\n" in metrics.text
        # Hung up: the generation is cancelled, the slot free again.
        with trio.fail_after(5):
            while any(
                slot["is_processing"] for slot in (await client.get("/upstream/echo/slots")).json()
            ):
                await trio.sleep(0.01)
