"""A non-streaming request relayed as an upstream stream, through the whole daemon (issue 18).

Two models run the same echo backend: ``echo`` with the default ``stream_upstream = true`` (its
non-streaming chat and completions requests go upstream as streams and are assembled), and
``plain`` with ``stream_upstream = false`` (relayed as they came, the way it was before). The
oracle is ``plain``'s answer to the same request: the client must not be able to tell the two
apart. What went upstream is seen by a backend that answers with the request it received.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio
from openai.types.chat import ChatCompletion

from tests.support.assembly import comparable
from tests.support.config import echo_cmd, make_config, model_server_cmd
from tests.support.daemon import running_daemon
from tests.support.http import RawConnection, assert_openai_error, chat, raw_post
from tests.support.status import (
    backend_stats,
    direct_client,
    load_model,
    wait_for_stats,
    wait_for_status,
)
from trioserve.config import Config
from trioserve.gateway.assemble import Assembler

pytestmark = [
    # The SDK leaves its SSE async generators unexhausted when a stream ends at [DONE]; the
    # connection is closed. Known upstream (as in test_assemble.py), not a leak of ours.
    pytest.mark.filterwarnings("ignore:Async generator 'openai\\.:ResourceWarning"),
    pytest.mark.filterwarnings(
        "ignore:Exception ignored in. <async_generator object (SSEDecoder|AsyncStream):"
        "pytest.PytestUnraisableExceptionWarning"
    ),
]

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
WORDS = "alpha beta gamma delta"
TOOLS = [
    {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "remember", "parameters": {"type": "object"}}},
]
# The echo backend's ids: "chatcmpl-echoN" / "cmpl-echoN", N its count of generations.
ID_SHAPE = {CHAT: re.compile(r"chatcmpl-echo\d+"), COMPLETIONS: re.compile(r"cmpl-echo\d+")}
OBJECT = {CHAT: "chat.completion", COMPLETIONS: "text_completion"}
# Issue 18's bound from a hang-up or deadline to the backend's cancellation (its goal, 0.1 s,
# is what bench/cancel.py measures: on 2 shared cores an in-process daemon may miss it by
# a scheduling delay).
CANCEL_WITHIN = 0.2


def two_models(state_dir: Path, *echo_options: str, **server: Any) -> Config:
    """``echo`` (stream_upstream, the default) and ``plain`` (stream_upstream = false), the
    same echo backend with ``echo_options``; ``server`` settings."""
    models: dict[str, dict[str, Any]] = {
        "echo": {"cmd": echo_cmd(*echo_options)},
        "plain": {"cmd": echo_cmd(*echo_options), "stream_upstream": False},
    }
    return make_config(state_dir, models, server=server)


def request(path: str, model: str, **extra: Any) -> dict[str, Any]:
    """A non-streaming request of ``path``'s kind for ``model``."""
    if path == CHAT:
        return chat(model, text=WORDS, **extra)
    return {"model": model, "prompt": WORDS, **extra}


async def both(
    client: httpx.AsyncClient, path: str, **extra: Any
) -> tuple[httpx.Response, httpx.Response]:
    """The same request to ``echo`` (assembled) and to ``plain`` (relayed as it came)."""
    assembled = await client.post(path, json=request(path, "echo", **extra))
    relayed = await client.post(path, json=request(path, "plain", **extra))
    return assembled, relayed


def without_created(answer: dict[str, Any]) -> dict[str, Any]:
    """The answer less ``created`` (the second it was made in)."""
    assert isinstance(answer.get("created"), int), answer
    return {key: value for key, value in answer.items() if key != "created"}


# -- the same answer --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "extra"),
    [
        (CHAT, {}),
        (COMPLETIONS, {}),
        (CHAT, {"max_tokens": 3}),
        (CHAT, {"max_tokens": 0}),
        (COMPLETIONS, {"max_tokens": 0}),
        (CHAT, {"n": 3}),
        (COMPLETIONS, {"n": 2}),
        (CHAT, {"logprobs": True, "top_logprobs": 2}),
        (COMPLETIONS, {"logprobs": 3}),
        (COMPLETIONS, {"n": 2, "logprobs": 2}),
        (CHAT, {"tools": TOOLS}),
        (CHAT, {"tools": TOOLS, "n": 2}),
        (CHAT, {"tools": TOOLS, "parallel_tool_calls": False}),
        (CHAT, {"stream": False, "stream_options": {"include_usage": False}}),
    ],
    ids=[
        "chat",
        "completion",
        "chat-max_tokens",
        "chat-no-tokens",
        "completion-no-tokens",
        "chat-n3",
        "completion-n2",
        "chat-logprobs",
        "completion-logprobs",
        "completion-n2-logprobs",
        "chat-tool-calls",
        "chat-tool-calls-n2",
        "chat-one-tool-call",
        "chat-stream-false-and-stream_options",
    ],
)
async def test_the_assembled_answer_is_the_non_streamed_one(
    state_dir: Path, path: str, extra: dict[str, Any]
) -> None:
    async with running_daemon(two_models(state_dir)) as (_, client):
        assembled, relayed = await both(client, path, **extra)
    for response in (assembled, relayed):
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
    ours, theirs = assembled.json(), relayed.json()
    assert ID_SHAPE[path].fullmatch(ours["id"]), ours["id"]
    assert ours["object"] == OBJECT[path]
    # Content, finish_reason, usage, logprobs, tool calls, the choices' order: all of it.
    assert without_created(ours) == without_created(theirs)


async def test_tool_calls_merge_as_the_sdk_accumulates_the_same_stream(state_dir: Path) -> None:
    messages: list[Any] = [{"role": "user", "content": WORDS}]
    tools: list[Any] = TOOLS
    async with running_daemon(two_models(state_dir)) as (info, client):
        body = {"model": "echo", "messages": messages, "tools": tools, "n": 2}
        assembled = await client.post(CHAT, json=body)
        assert assembled.status_code == 200, assembled.text
        sdk = openai.AsyncOpenAI(
            base_url=info.url + "/v1",
            api_key="x",
            max_retries=0,
            http_client=openai.DefaultAsyncHttpxClient(trust_env=False),
        )
        try:
            # The same request streamed through the daemon (relayed as it comes), accumulated
            # by the SDK's own code.
            async with sdk.chat.completions.stream(
                model="echo", messages=messages, tools=tools, n=2
            ) as stream:
                accumulated = await stream.get_final_completion()
        finally:
            await sdk.close()

    def normalized(completion: ChatCompletion) -> dict[str, Any]:
        # Ids (the tool calls' ones included) name the generation: two requests, two ids.
        text = json.dumps(comparable(completion)).replace(completion.id, "ID")
        answer: dict[str, Any] = json.loads(text)
        del answer["created"]
        return answer

    ours = normalized(ChatCompletion.model_validate_json(assembled.content))
    assert ours == normalized(accumulated)
    calls = [choice["message"]["tool_calls"] for choice in ours["choices"]]
    assert [[call["function"]["name"] for call in each] for each in calls] == [
        ["lookup", "remember"]
    ] * 2
    # Choice 1's reply starts at the input's word 1; 8 tokens (the echo backend's default).
    arguments = json.loads(calls[1][0]["function"]["arguments"])
    assert arguments == {"text": "beta gamma delta alpha beta gamma delta alpha"}


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS], ids=["chat", "completion"])
@pytest.mark.parametrize(
    "trigger",
    [
        {"echo_error_after": 0, "echo_error_code": 429},
        {"echo_error_after": 3},
        {"echo_error_after": 3, "echo_error_code": 503},
        {"echo_error_after": 3, "echo_error_code": 400, "n": 2},
    ],
    ids=["before-the-stream-429", "inside-500", "inside-503", "inside-400-n2"],
)
async def test_a_backend_error_is_the_status_and_body_of_the_non_streamed_request(
    state_dir: Path, path: str, trigger: dict[str, Any]
) -> None:
    async with running_daemon(two_models(state_dir), admin=True) as (_, client):
        port = (await load_model(client, "echo"))["port"]
        assembled, relayed = await both(client, path, **trigger)
        stats = await backend_stats(port)
    assert assembled.status_code == relayed.status_code == trigger.get("echo_error_code", 500)
    assert assembled.headers["content-type"] == "application/json"
    # The backend's own error, as the client would have got it: the same bytes.
    assert assembled.content == relayed.content
    error = assembled.json()["error"]
    assert error["code"] == assembled.status_code and error["message"], error
    # The failed generation was read to its end (and counted so), not cut off by us.
    assert stats == {"started": 1, "completed": 1, "cancelled": 0}, stats


# -- cancellation -----------------------------------------------------------------------------


class FedChunks:
    """A spy on ``Assembler.feed``: ``reached`` is set once the daemon's assemblers (in this
    trio run) were fed ``at_least`` upstream reads, the sign that an assembly is under way."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, at_least: int) -> None:
        self.count = 0
        self.reached = trio.Event()
        feed = Assembler.feed

        def counted(assembler: Assembler, data: bytes) -> None:
            self.count += 1
            if self.count >= at_least:
                self.reached.set()
            feed(assembler, data)

        monkeypatch.setattr(Assembler, "feed", counted)


@pytest.mark.parametrize(
    ("model", "path"),
    [("echo", CHAT), ("echo", COMPLETIONS), ("plain", CHAT)],
    ids=["assembled-chat", "assembled-completion", "stream_upstream-false-chat"],
)
@pytest.mark.quiet  # CANCEL_WITHIN, 0.2 s
async def test_a_client_hanging_up_cancels_the_upstream_generation(
    state_dir: Path, model: str, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 200 tokens × 50 ms: 10 s of generation, far longer than the test waits.
    config = two_models(state_dir, "--tokens", "200", "--token-delay", "0.05")
    fed = FedChunks(monkeypatch, at_least=3)
    async with running_daemon(config, admin=True) as (info, client), direct_client() as direct:
        port = (await load_model(client, model))["port"]
        connection = await RawConnection.open(info.url)
        assert await connection.send(raw_post(request(path, model), path=path))
        await wait_for_stats(port, "started", 1, client=direct)
        if model == "echo":
            # A few tokens in: the upstream stream is under way, its answer half assembled.
            with trio.fail_after(10):
                await fed.reached.wait()
        # (``plain``'s backend computes its whole answer, 10 s, before it sends a byte.)
        await connection.aclose()
        closed_at = trio.current_time()
        stats = await wait_for_stats(port, "cancelled", 1, client=direct)
        took = trio.current_time() - closed_at
        assert took < CANCEL_WITHIN, f"the backend saw the hang-up {took:.3f}s later"
        assert stats["completed"] == 0
        await wait_for_status(client, model, "in_flight", 0)


@pytest.mark.quiet  # CANCEL_WITHIN, 0.2 s
async def test_first_byte_timeout_bounds_the_whole_assembled_answer(state_dir: Path) -> None:
    # The upstream stream's first chunk comes at once; the client's first byte is the whole
    # answer (5 s away), as it was when the backend sent it whole at the end.
    config = two_models(state_dir, "--tokens", "100", "--token-delay", "0.05", first_byte_timeout=1)
    async with running_daemon(config, admin=True) as (_, client), direct_client() as direct:
        port = (await load_model(client, "echo"))["port"]
        start = trio.current_time()
        response = await client.post(CHAT, json=request(CHAT, "echo"))
        answered_at = trio.current_time()
        error = assert_openai_error(response, 504, "timeout")
        assert "first_byte_timeout" in error["message"], error
        assert 0.9 < answered_at - start < 2, answered_at - start
        stats = await wait_for_stats(port, "cancelled", 1, client=direct)
        assert trio.current_time() - answered_at < CANCEL_WITHIN
        assert stats["completed"] == 0


# -- what goes upstream -----------------------------------------------------------------------

# A backend that answers every POST with what it received, as JSON (a backend that ignores
# "stream": true: the relay passes such an answer through as it is).
RECORDER = model_server_cmd(
    """
    answer = json.dumps({"path": self.path, "received": body.decode()}).encode()
    self.send_response(200)
    self.send_header("content-type", "application/json")
    self.send_header("content-length", str(len(answer)))
    self.end_headers()
    self.wfile.write(answer)
    """
)


async def test_only_non_streaming_chat_and_completions_go_upstream_as_streams(
    state_dir: Path,
) -> None:
    models: dict[str, dict[str, Any]] = {
        "rec": {"cmd": RECORDER},
        "rec-plain": {"cmd": RECORDER, "stream_upstream": False},
    }
    embedding = {"model": "rec", "input": ["one", "two"]}
    async with running_daemon(make_config(state_dir, models)) as (_, client):

        async def upstream_got(path: str, body: dict[str, Any]) -> Any:
            sent = json.dumps(body).encode()
            response = await client.post(
                path, content=sent, headers={"content-type": "application/json"}
            )
            assert response.status_code == 200, response.text
            answer = response.json()
            assert answer["path"] == path
            received = answer["received"].encode()
            # Untouched requests go upstream byte for byte.
            return json.loads(received) if received != sent else "as sent"

        streamed = {"stream": True, "stream_options": {"include_usage": True}}
        for path in (CHAT, COMPLETIONS):
            for extra in ({}, {"stream": False}, {"stream_options": {"include_usage": False}}):
                body = request(path, "rec", **extra)
                assert await upstream_got(path, body) == {**body, **streamed}
            # A streaming client's request, and any request of a stream_upstream = false model.
            assert await upstream_got(path, request(path, "rec", stream=True)) == "as sent"
            assert await upstream_got(path, request(path, "rec-plain")) == "as sent"
        assert await upstream_got("/v1/embeddings", embedding) == "as sent"


# A backend that names its headers as llama-server (cpp-httplib) does, "Content-Type", and
# answers like it: a stream of "Hel", "lo" and a usage chunk, or the same answer whole.
CAPITALIZED = model_server_cmd(
    """
    head = {"id": "chatcmpl-x", "created": 1, "model": "m"}
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    if json.loads(body).get("stream"):
        chunk = dict(head, object="chat.completion.chunk")
        events = [
            dict(chunk, choices=[{"index": 0, "delta": {"role": "assistant", "content": None},
                                  "finish_reason": None}]),
            dict(chunk, choices=[{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]),
            dict(chunk, choices=[{"index": 0, "delta": {"content": "lo"}, "finish_reason": None}]),
            dict(chunk, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}]),
            dict(chunk, choices=[], usage=usage),
        ]
        answer = b"".join(b"data: " + json.dumps(e).encode() + b"\\n\\n" for e in events)
        answer += b"data: [DONE]\\n\\n"
        kind = "text/event-stream"
    else:
        message = {"role": "assistant", "content": "Hello"}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        answer = json.dumps(dict(head, object="chat.completion", choices=[choice], usage=usage))
        answer = answer.encode()
        kind = "application/json; charset=utf-8"
    self.send_response(200)
    self.send_header("Content-Type", kind)
    self.send_header("Content-Length", str(len(answer)))
    self.end_headers()
    self.wfile.write(answer)
    """
)


async def test_a_backend_that_capitalizes_its_header_names_is_assembled(state_dir: Path) -> None:
    models: dict[str, dict[str, Any]] = {
        "cap": {"cmd": CAPITALIZED},
        "cap-plain": {"cmd": CAPITALIZED, "stream_upstream": False},
    }
    async with running_daemon(make_config(state_dir, models)) as (_, client):
        assembled = await client.post(CHAT, json=request(CHAT, "cap"))
        relayed = await client.post(CHAT, json=request(CHAT, "cap-plain"))
    assert assembled.status_code == relayed.status_code == 200
    assert assembled.headers["content-type"] == "application/json", assembled.headers
    assert assembled.json() == relayed.json()


async def test_embeddings_are_relayed_as_before(state_dir: Path) -> None:
    body = {"input": ["one two", "three"]}
    async with running_daemon(two_models(state_dir), admin=True) as (_, client):
        port = (await load_model(client, "echo"))["port"]
        ours = await client.post("/v1/embeddings", json={"model": "echo", **body})
        theirs = await client.post("/v1/embeddings", json={"model": "plain", **body})
        stats = await backend_stats(port)
    assert ours.status_code == theirs.status_code == 200
    assert ours.content == theirs.content
    assert [item["index"] for item in ours.json()["data"]] == [0, 1]
    # Not a generation: the backend counted nothing, streamed or not.
    assert stats == {"started": 0, "completed": 0, "cancelled": 0}


# -- accounting -------------------------------------------------------------------------------


async def test_the_assembled_usage_is_counted_for_the_user(state_dir: Path) -> None:
    async with running_daemon(two_models(state_dir), admin=True) as (_, client):
        await load_model(client, "echo")

        async def anonymous() -> dict[str, int]:
            users = (await client.get("/admin/status")).json()["users"]
            totals: dict[str, int] = users["anonymous"]
            return totals

        before = await anonymous()
        answers = [
            await client.post(CHAT, json=request(CHAT, "echo", n=2)),
            await client.post(COMPLETIONS, json=request(COMPLETIONS, "echo", max_tokens=5)),
            await client.post(CHAT, json=request(CHAT, "echo", tools=TOOLS)),
        ]
        usages = [answer.json()["usage"] for answer in answers]
        # Counted once the relay has finished the request, a moment after the client has it.
        with trio.fail_after(5):
            while (after := await anonymous())["requests"] < before["requests"] + len(answers):
                await trio.sleep(0.01)
    for key in ("prompt_tokens", "completion_tokens"):
        assert after[key] - before[key] == sum(usage[key] for usage in usages), key
    assert after["completion_tokens"] - before["completion_tokens"] == 16 + 5 + 16
