"""A real LLM behind trioserve: llama.cpp's llama-server serving Gemma 3 270M (Q4_K_M).

Needs ``make real-model`` (builds .cache/llama-server/bin/llama-server and assembles the GGUF);
every test here is skipped with the reason when either is missing. ``TRIOSERVE_LLAMA_SERVER``
and ``TRIOSERVE_GGUF`` point the tests at another build or model file.

The client side is the official OpenAI SDK, as a user would write it. What llama-server does is
observed from its own side: its ``/slots`` endpoint says whether a slot is generating, and its
log (read through trioserve's logs endpoint) when it cancelled a task.
Generations are kept short, or cut short on purpose, so the file runs in well under 90 s.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
import trio

from tests.support.config import daemon_config, make_config
from tests.support.daemon import TRIOSERVE_BIN, DaemonProcess, running_daemon
from tests.support.ports import bindable
from tests.support.processes import alive, children_with_marker, eventually
from tests.support.real_model import MODEL, llama_model, needs_real_model
from tests.support.status import load_model
from trioserve.daemon import DaemonInfo

pytestmark = [
    *needs_real_model(),
    # The OpenAI SDK leaves its SSE async generators unexhausted when a stream ends at [DONE]
    # or is closed early (it closes the response, not the generators); the connection is
    # closed. Known upstream, as with httpx in pyproject.toml, not a leak of ours.
    pytest.mark.filterwarnings(
        "ignore:Async generator '(openai|httpx2|httpcore2)\\.:ResourceWarning"
    ),
    pytest.mark.filterwarnings(
        "ignore:Exception ignored in. <async_generator object "
        "(SSEDecoder|AsyncStream|Response|BoundAsyncStream|AsyncResponseStream|PoolByteStream"
        "|HTTP11ConnectionByteStream|AsyncHTTP11Connection):"
        "pytest.PytestUnraisableExceptionWarning"
    ),
]

# A prompt the model answers at length; with ignore_eos (a llama-server extension) the answer
# runs exactly max_tokens tokens, so "long" and "short" generations are predictable.
LONG_PROMPT = [{"role": "user", "content": "Count from 1 to 1000, separated by commas."}]
SHORT_PROMPT = [{"role": "user", "content": "Say hello in one short sentence."}]
# ≈ 58 tokens/s on this 2-core machine: 1200 tokens is ~20 s, far longer than any test waits.
LONG_TOKENS = 1200


@asynccontextmanager
async def sdk(info: DaemonInfo) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(
        base_url=info.url + "/v1",
        api_key="x",
        max_retries=0,
        timeout=60,
        http_client=openai.DefaultAsyncHttpxClient(trust_env=False),
    )
    try:
        yield client
    finally:
        await client.close()


async def load(client: httpx.AsyncClient) -> dict[str, Any]:
    """Start the model; return its /admin/status entry (pid, port, ...)."""
    return await load_model(client, MODEL, timeout=60)


async def long_generation(oai: openai.AsyncOpenAI, *, stream: bool) -> Any:
    """A request for LONG_TOKENS tokens (~20 s of generation); the answer, or its stream."""
    return await oai.chat.completions.create(
        model=MODEL,
        messages=LONG_PROMPT,
        max_tokens=LONG_TOKENS,
        stream=stream,
        extra_body={"ignore_eos": True},
    )


async def slots(port: int) -> list[dict[str, Any]]:
    """llama-server's own view of its slots."""
    async with httpx.AsyncClient(trust_env=False, timeout=10) as direct:
        response = await direct.get(f"http://127.0.0.1:{port}/slots")
    response.raise_for_status()
    result: list[dict[str, Any]] = response.json()
    return result


def decoded(slot: dict[str, Any]) -> int:
    return int(slot.get("next_token", [{}])[0].get("n_decoded", 0))


async def wait_until_generating(port: int, *, tokens: int = 5, within: float = 20) -> None:
    """Until llama-server's slot 0 has generated ``tokens`` tokens (prompt done, decoding)."""
    with trio.fail_after(within):
        while True:
            slot = (await slots(port))[0]
            if slot["is_processing"] and decoded(slot) >= tokens:
                return
            await trio.sleep(0.05)


async def wait_until_idle(port: int, *, within: float) -> None:
    """Until no llama-server slot is processing. Polled gently: see ``cancel_lines``."""
    last: list[dict[str, Any]] = []
    with trio.move_on_after(within):
        while True:
            last = await slots(port)
            if not any(slot["is_processing"] for slot in last):
                return
            await trio.sleep(0.25)
    state = [(slot["is_processing"], decoded(slot)) for slot in last]
    pytest.fail(f"llama-server's slots still busy {within}s later: (processing, decoded) {state}")


async def cancel_lines(client: httpx.AsyncClient) -> int:
    """How often llama-server has logged that it cancelled a task, read through trioserve.

    Not by polling llama-server: any request to it (``/slots`` included) wakes the threads that
    wait on non-streaming answers, and each wake-up postpones their once-a-second check of the
    client connection by another second (``server_response::recv_with_timeout``). Polled
    often, llama-server would never notice the disconnect we are testing.
    """
    logs = await client.get(f"/admin/models/{MODEL}/logs", params={"tail": 1000})
    return logs.text.count("cancel task")


async def wait_for_cancel(client: httpx.AsyncClient, before: int, *, within: float) -> float:
    """Until llama-server logs a cancelled task beyond ``before``; return how long it took."""
    start = trio.current_time()
    with trio.move_on_after(within):
        while await cancel_lines(client) <= before:
            await trio.sleep(0.05)
        return trio.current_time() - start
    logs = await client.get(f"/admin/models/{MODEL}/logs", params={"tail": 15})
    pytest.fail(f"llama-server did not cancel the request within {within}s:\n{logs.text}")


async def served_at_once(oai: openai.AsyncOpenAI) -> float:
    """A short request right after: with one slot it is only served once the slot is free.

    Streamed, so that a test's short first_byte_timeout applies to its first token only."""
    start = trio.current_time()
    stream = await oai.chat.completions.create(
        model=MODEL, messages=SHORT_PROMPT, max_tokens=8, stream=True
    )
    text = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
    assert "".join(text)
    return trio.current_time() - start


# -- answers ----------------------------------------------------------------------------------


async def test_chat_answer(state_dir: Path) -> None:
    config = make_config(state_dir, {MODEL: llama_model()})
    async with running_daemon(config) as (info, _), sdk(info) as oai:
        reply = await oai.chat.completions.create(
            model=MODEL, messages=SHORT_PROMPT, max_tokens=16, temperature=0
        )
    assert reply.choices[0].message.content
    assert reply.choices[0].message.content.strip()
    assert reply.usage is not None and reply.usage.completion_tokens > 0


@pytest.mark.quiet  # the pace of llama-server's chunks
async def test_stream_arrives_incrementally(state_dir: Path) -> None:
    config = make_config(state_dir, {MODEL: llama_model()})
    async with running_daemon(config, admin=True) as (info, client), sdk(info) as oai:
        await load(client)
        stream = await oai.chat.completions.create(
            model=MODEL,
            messages=LONG_PROMPT,
            max_tokens=48,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        arrivals: list[float] = []
        text: list[str] = []
        finish = None
        async for chunk in stream:
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            if choice.delta.content:
                arrivals.append(trio.current_time())
                text.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert "".join(text).strip()
    assert finish == "length"
    # One chunk per token, relayed as generated: many chunks, spread over the generation
    # (48 tokens at ~58 tokens/s is ~0.8 s), never bunched up at the end.
    assert len(arrivals) >= 20, len(arrivals)
    spread = arrivals[-1] - arrivals[0]
    assert spread >= 0.3, f"all chunks arrived within {spread:.3f}s"
    bunched = max(sum(1 for t in arrivals if s <= t < s + 0.1) for s in arrivals)
    assert bunched <= len(arrivals) // 2, f"{bunched} of {len(arrivals)} chunks within 100 ms"


async def test_two_concurrent_requests(state_dir: Path) -> None:
    config = make_config(state_dir, {MODEL: llama_model(parallel=2)})
    async with running_daemon(config, admin=True) as (info, client), sdk(info) as oai:
        entry = await load(client)
        answers: dict[int, str] = {}
        busy_slots = 0

        async def ask(i: int) -> None:
            reply = await oai.chat.completions.create(
                model=MODEL,
                messages=LONG_PROMPT,
                max_tokens=32,
                extra_body={"ignore_eos": True},
            )
            answers[i] = reply.choices[0].message.content or ""

        async def watch() -> None:
            nonlocal busy_slots
            while len(answers) < 2:
                busy = sum(slot["is_processing"] for slot in await slots(entry["port"]))
                busy_slots = max(busy_slots, busy)
                await trio.sleep(0.1)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, 0)
            nursery.start_soon(ask, 1)
            nursery.start_soon(watch)
    assert all(answers[i].strip() for i in (0, 1)), answers
    # Both were forwarded at once: llama-server generated them in two slots side by side.
    assert busy_slots == 2


# -- cancellation and deadlines ---------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
@pytest.mark.quiet  # cancellation within 3 s of llama-server's
async def test_disconnect_stops_generation(state_dir: Path, stream: bool) -> None:
    # One slot: if llama-server went on generating for the gone client, the next request
    # would wait for the rest of it (~20 s).
    config = make_config(state_dir, {MODEL: llama_model(parallel=1)})
    async with running_daemon(config, admin=True) as (info, client), sdk(info) as oai:
        port = (await load(client))["port"]
        cancelled_before = await cancel_lines(client)

        async def long_request() -> None:
            response = await long_generation(oai, stream=stream)
            if stream:
                async for _ in response:  # type: ignore[union-attr]
                    pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_request)
            await wait_until_generating(port)
            # The client goes away mid-answer: its task is cancelled, its connection closed.
            nursery.cancel_scope.cancel()
        # llama-server stops generating for that request: it logs the cancelled task and the
        # slot goes idle, though it had ~20 s of tokens still to generate.
        assert await wait_for_cancel(client, cancelled_before, within=4) < 3.0
        await wait_until_idle(port, within=2)
        assert await served_at_once(oai) < 8.0


@pytest.mark.parametrize(
    ("stream", "deadline"),
    [(True, "request_timeout"), (False, "first_byte_timeout")],
    ids=["stream-request_timeout", "non-stream-first_byte_timeout"],
)
@pytest.mark.quiet  # deadlines to the second, with llama-server computing
async def test_deadline_aborts_generation(state_dir: Path, stream: bool, deadline: str) -> None:
    config = make_config(state_dir, {MODEL: llama_model(parallel=1)}, server={deadline: 3})
    async with running_daemon(config, admin=True) as (info, client), sdk(info) as oai:
        port = (await load(client))["port"]
        cancelled_before = await cancel_lines(client)
        start = trio.current_time()
        chunks = 0
        with pytest.raises(openai.APIError) as caught:
            response = await long_generation(oai, stream=stream)
            async for _ in response:  # type: ignore[union-attr]
                chunks += 1
        took = trio.current_time() - start
        error = caught.value
        assert isinstance(error.body, dict) and error.body["code"] == "timeout", error.body
        assert deadline in error.message
        if stream:
            # The stream had begun (200): the error is its last event.
            assert chunks > 3
        else:
            assert isinstance(error, openai.APIStatusError) and error.status_code == 504
        assert 2.9 < took < 5.0, took
        # The upstream request was aborted: llama-server cancels it and the slot is free again.
        # (No follow-up request here: the short deadline would apply to it too.)
        assert await wait_for_cancel(client, cancelled_before, within=4) < 3.0
        await wait_until_idle(port, within=2)


# -- lifecycle --------------------------------------------------------------------------------


def port_is_free(port: int) -> bool:
    """Nobody listens on it (connections the stopped child closed may linger in TIME_WAIT
    for a minute; they do not hold the port for a server)."""
    return bindable(port, reuse_address=True)


async def test_unload_stops_the_process_and_frees_its_port(state_dir: Path) -> None:
    config = make_config(state_dir, {MODEL: llama_model()})
    async with running_daemon(config, admin=True) as (info, client):
        entry = await load(client)
        pid, port = entry["pid"], entry["port"]
        assert not port_is_free(port)
        assert [p.pid for p in children_with_marker(info.instance)] == [pid]

        response = await client.post(f"/admin/models/{MODEL}/unload")
        assert response.status_code == 200, response.text
        assert response.json()["state"] == "stopped"
        assert not alive(pid)
        assert port_is_free(port)
        assert children_with_marker(info.instance) == []
        status = (await client.get("/admin/status")).json()["models"][MODEL]
        assert status["state"] == "stopped" and status["pid"] is None and status["port"] is None


async def test_missing_gguf_fails_with_llama_servers_error(state_dir: Path, tmp_path: Path) -> None:
    no_such_file = tmp_path / "no-such-model.gguf"
    config = make_config(state_dir, {MODEL: llama_model(model_file=no_such_file)})
    # llama-server's own words for it.
    own_error = f"failed to open GGUF file '{no_such_file}'"
    async with running_daemon(config, admin=True) as (info, client), sdk(info) as oai:
        response = await client.post(f"/admin/models/{MODEL}/load")
        assert response.status_code in (502, 503), response.text
        assert own_error in response.json()["error"]["message"]

        status = (await client.get("/admin/status")).json()["models"][MODEL]
        assert status["state"] == "failed"
        assert own_error in status["last_error"]
        logs = await client.get(f"/admin/models/{MODEL}/logs", params={"tail": 100})
        assert own_error in logs.text

        with pytest.raises(openai.APIStatusError) as caught:
            await oai.chat.completions.create(model=MODEL, messages=SHORT_PROMPT, max_tokens=4)
        assert caught.value.status_code in (502, 503)
        assert own_error in caught.value.message


@pytest.mark.slow
async def test_cleanup_kills_llama_server_left_by_a_killed_daemon(
    tmp_path: Path, spawn_daemon: Any
) -> None:
    config, url = daemon_config(
        tmp_path / "real-model.toml",
        tmp_path / "state",
        {MODEL: llama_model()},
        supervisor={"start_timeout": 30},
    )
    daemon: DaemonProcess = spawn_daemon(config, url)
    async with httpx.AsyncClient(
        base_url=url, trust_env=False, timeout=60, auth=daemon.admin
    ) as client:
        entry = await load(client)
    orphan = psutil.Process(entry["pid"])
    try:
        # With its guard: a daemon SIGKILLed alone has its models stopped by the guard.
        daemon.kill_with_its_guard()
        # The daemon had no chance to stop its child: llama-server lives on, still listening.
        assert alive(orphan.pid)
        assert not port_is_free(entry["port"])

        result = await trio.run_process(
            [str(TRIOSERVE_BIN), "cleanup", "--yes", "--config", str(config)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        output = (result.stdout + result.stderr).decode(errors="replace")
        assert result.returncode == 0, output
        # Reaped by init, not by us: nothing announces it.
        await eventually(
            lambda: not alive(orphan.pid),
            within=5,
            what=f"llama-server {orphan.pid} killed by cleanup:\n{output}",
        )
        assert str(orphan.pid) in output, output
    finally:
        if alive(orphan.pid):
            os.killpg(orphan.pid, signal.SIGKILL)
