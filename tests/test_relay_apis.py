"""Every API path, routed and guarded alike: ``/upstream`` and who may use it, light requests
that never wait behind a generation, Anthropic's conventions on Anthropic's paths, stored
responses that cannot be routed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.support.admin import AdminAuth
from tests.support.config import echo_config, make_config
from tests.support.daemon import running_daemon
from tests.support.http import assert_openai_error, chat, read_sse
from tests.support.status import load_model, model_status, wait_for_status

MESSAGES: dict[str, Any] = {
    "model": "echo",
    "max_tokens": 4,
    "messages": [{"role": "user", "content": "hello"}],
}


def assert_anthropic_error(response: httpx.Response, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error", body
    assert body["error"]["type"] == kind, body
    message: str = body["error"]["message"]
    assert message
    return message


# -- /upstream/{model}/{path} ------------------------------------------------------------------


async def test_upstream_needs_admin_by_default_and_starts_the_model(state_dir: Path) -> None:
    async with running_daemon(echo_config(state_dir)) as (_, client):
        refused = await client.get("/upstream/echo/stats")
        assert_openai_error(refused, 401, "invalid_api_key")
        assert "admin" in refused.json()["error"]["message"]
        assert (await model_status(client, "echo"))["state"] == "stopped"
        answered = await client.get("/upstream/echo/stats", auth=AdminAuth(state_dir))
        assert answered.status_code == 200, answered.text
        assert set(answered.json()) == {"started", "completed", "cancelled"}
        assert (await model_status(client, "echo"))["state"] == "ready"


async def test_upstream_passes_method_path_query_and_body_through(state_dir: Path) -> None:
    config = echo_config(state_dir, server={"upstream_passthrough": "users"})
    async with running_daemon(config) as (_, client):
        # A streamed answer comes through as the model server sent it.
        async with client.stream(
            "POST", "/upstream/echo/v1/chat/completions", json=chat(stream=True)
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = await read_sse(response)
        assert lines[-1] == "data: [DONE]"
        # The model server's own errors come through as it answered them.
        missing = await client.get("/upstream/echo/no/such/path?x=1")
        assert missing.status_code == 404
        assert "/no/such/path" in missing.text
        wrong = await client.get("/upstream/echo/v1/chat/completions")
        assert wrong.status_code == 405
        unknown = await client.get("/upstream/nope/stats")
        assert_openai_error(unknown, 404, "model_not_found")


async def test_upstream_users_mode_takes_v1_keys_and_off_is_404(state_dir: Path) -> None:
    users = echo_config(
        state_dir, server={"upstream_passthrough": "users", "api_keys": ["sk-user"]}
    )
    async with running_daemon(users) as (_, client):
        assert_openai_error(await client.get("/upstream/echo/stats"), 401, "invalid_api_key")
        keyed = await client.get("/upstream/echo/stats", headers={"x-api-key": "sk-user"})
        assert keyed.status_code == 200, keyed.text
    off = echo_config(state_dir, server={"upstream_passthrough": "off"})
    async with running_daemon(off) as (_, client):
        refused = await client.get("/upstream/echo/stats", auth=AdminAuth(state_dir))
        assert refused.status_code == 404
        assert "upstream_passthrough" in refused.json()["error"]["message"]


# -- light requests ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/tokenize", {"model": "echo", "content": "hello world"}),
        ("/v1/messages/count_tokens", {"model": "echo", "messages": MESSAGES["messages"]}),
        ("/v1/responses/input_tokens", {"model": "echo", "input": "hello"}),
    ],
    ids=["tokenize", "count_tokens", "input_tokens"],
)
async def test_light_requests_never_wait_behind_generations(
    state_dir: Path, path: str, body: dict[str, Any]
) -> None:
    """One slot, taken by a 60 s generation, another queued behind it: a light request is
    answered all the same, and the queue is as it was."""
    config = echo_config(state_dir, "--token-delay", "10", max_concurrency=1)
    async with running_daemon(config, admin=True) as (_, client):
        await load_model(client, "echo")
        async with trio.open_nursery() as nursery:

            async def generate() -> None:
                await client.post("/v1/chat/completions", json=chat(stream=True))

            nursery.start_soon(generate)
            await wait_for_status(client, "echo", "in_flight", 1)
            nursery.start_soon(generate)
            await wait_for_status(client, "echo", "queued", 1)
            with trio.fail_after(5):
                answered = await client.post(path, json=body)
            assert answered.status_code == 200, answered.text
            assert answered.json()
            status = await model_status(client, "echo")
            assert (status["in_flight"], status["queued"]) == (1, 1)
            nursery.cancel_scope.cancel()


# -- Anthropic's conventions ---------------------------------------------------------------------


async def test_messages_errors_come_in_anthropics_shape(state_dir: Path) -> None:
    config = echo_config(state_dir, server={"api_keys": ["sk-team"]})
    async with running_daemon(config) as (_, client):
        nokey = await client.post("/v1/messages", json=MESSAGES)
        assert_anthropic_error(nokey, 401, "authentication_error")
        unknown = await client.post(
            "/v1/messages", json={**MESSAGES, "model": "nope"}, headers={"x-api-key": "sk-team"}
        )
        assert "echo" in assert_anthropic_error(unknown, 404, "not_found_error")
        broken = await client.post(
            "/v1/messages/count_tokens", content=b"{", headers={"x-api-key": "sk-team"}
        )
        assert_anthropic_error(broken, 400, "invalid_request_error")
        # The same cases stay in OpenAI's shape on OpenAI's paths.
        openai = await client.post("/v1/chat/completions", json=chat(model="nope"))
        assert_openai_error(openai, 401, "invalid_api_key")


async def test_anthropic_streams_get_pings_while_the_model_loads(state_dir: Path) -> None:
    config = echo_config(state_dir, "--startup-delay", "2.5")
    async with (
        running_daemon(config) as (_, client),
        client.stream("POST", "/v1/messages", json={**MESSAGES, "stream": True}) as r,
    ):
        assert r.status_code == 200
        lines = await read_sse(r)
    pings = [i for i, line in enumerate(lines) if line == "event: ping"]
    assert pings, lines
    assert lines[pings[0] + 1] == 'data: {"type": "ping"}'
    assert not any(line.startswith(": loading") for line in lines), lines
    assert "event: message_start" in lines[pings[-1] :], lines
    assert lines[-2:] == ["event: message_stop", 'data: {"type":"message_stop"}'], lines[-4:]


async def test_an_error_after_the_anthropic_stream_began_is_an_error_event(
    state_dir: Path,
) -> None:
    """A model that fails to start after the pings began: ``event: error`` with Anthropic's
    body ends the stream."""
    cmd = ["{python}", "-c", "import time, sys; time.sleep(1.5); sys.exit(2)"]
    body = {**MESSAGES, "model": "bad", "stream": True}
    async with (
        running_daemon(make_config(state_dir, {"bad": {"cmd": cmd}})) as (_, client),
        client.stream("POST", "/v1/messages", json=body) as r,
    ):
        assert r.status_code == 200
        lines = await read_sse(r)
    assert lines[0] == "event: ping", lines
    assert lines[-2] == "event: error", lines
    error = json.loads(lines[-1].removeprefix("data: "))
    assert error["type"] == "error" and error["error"]["type"] == "api_error", error


async def test_models_list_in_anthropics_shape_for_anthropics_clients(state_dir: Path) -> None:
    async with running_daemon(echo_config(state_dir, aliases=["parrot"])) as (_, client):
        listed = await client.get("/v1/models", headers={"anthropic-version": "2023-06-01"})
        body = listed.json()
        assert [m["id"] for m in body["data"]] == ["echo", "parrot"]
        assert body["data"][0]["type"] == "model"
        assert body["data"][0]["created_at"].endswith("Z")
        assert (body["has_more"], body["first_id"], body["last_id"]) == (False, "echo", "parrot")
        openai = (await client.get("/v1/models")).json()
        assert openai["object"] == "list" and openai["data"][0]["object"] == "model"


# -- stored responses ----------------------------------------------------------------------------


async def test_stored_responses_cannot_be_routed_and_say_so(state_dir: Path) -> None:
    async with running_daemon(echo_config(state_dir)) as (_, client):
        for method in ("GET", "DELETE"):
            answer = await client.request(method, "/v1/responses/resp_123")
            assert answer.status_code == 404
            assert "cannot route" in answer.json()["error"]["message"]
