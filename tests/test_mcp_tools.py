"""/mcp with the SDK's own client, under trio, against an in-process daemon and echo: every
tool, progress, the caller's identity, admin tools, errors as isError."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import trio
from mcp import Client
from mcp.shared.exceptions import MCPError

from tests.support.admin import admin_token
from tests.support.config import echo_config
from tests.support.daemon import running_daemon
from tests.support.mcp import mcp_session
from trioserve.config import UserConfig


async def test_chat_embed_and_models_against_echo(state_dir: Path) -> None:
    config = echo_config(state_dir, "--tokens", "5", aliases=["e"])
    async with running_daemon(config, admin=True) as (info, client):
        async with mcp_session(info.url) as session:
            tools = {tool.name: tool for tool in (await session.list_tools()).tools}
            assert set(tools) == {"chat", "embed", "models"}
            chat = tools["chat"]
            assert chat.input_schema["properties"]["model"]["enum"] == ["echo", "e"]
            assert chat.annotations is not None and chat.annotations.read_only_hint is False
            assert chat.output_schema is not None
            assert set(chat.output_schema["required"]) >= {"model", "content"}
            result = await session.call_tool("chat", {"model": "e", "prompt": "hello there"})
            assert not result.is_error, result
            assert result.structured_content is not None
            assert result.structured_content["model"] == "echo"
            assert result.structured_content["finish_reason"] == "stop"
            assert result.structured_content["usage"]["completion_tokens"] == 5
            assert result.content[0].text == result.structured_content["content"]  # type: ignore[union-attr]
            embedded = await session.call_tool("embed", {"model": "echo", "input": ["a", "b"]})
            assert not embedded.is_error, embedded
            assert embedded.structured_content is not None
            assert len(embedded.structured_content["embeddings"]) == 2
            models = await session.call_tool("models", {})
            assert models.structured_content is not None
            assert models.structured_content["models"]["echo"]["state"] == "ready"
        # The call went through the relay: counted as a /v1 request of the model.
        metrics = (await client.get("/metrics")).text
        assert 'trioserve_requests_total{model="echo",status="200"}' in metrics


async def test_progress_while_generating(state_dir: Path) -> None:
    config = echo_config(
        state_dir, "--tokens", "12", "--token-delay", "0.05", "--startup-delay", "1.5"
    )
    async with running_daemon(config) as (info, _):
        received: list[tuple[float, float | None, str | None]] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            received.append((progress, total, message))

        async with mcp_session(info.url) as session:
            result = await session.call_tool(
                "chat",
                {"model": "echo", "prompt": "hi", "max_tokens": 12},
                progress_callback=on_progress,
            )
        assert not result.is_error, result
        # While the model starts (on demand), then while it generates.
        assert any(
            message and "echo" in message and 0 < value < 1 for value, _, message in received
        ), received
        # Every notification's value larger than the one before (MCP's rule for progress).
        values = [value for value, _, _ in received]
        assert values == sorted(set(values)), received
        generating = [p for p in received if p[0] >= 1]
        assert generating and all(total == 12 for _, total, _ in generating), received
        assert [v for v, _, _ in generating] == sorted(v for v, _, _ in generating)


async def test_a_model_error_is_an_is_error_result(state_dir: Path) -> None:
    config = echo_config(state_dir)
    async with running_daemon(config) as (info, _), mcp_session(info.url) as session:
        result = await session.call_tool("chat", {"model": "nope", "prompt": "hi"})
        assert result.is_error
        assert "nope" in result.content[0].text  # type: ignore[union-attr]


async def test_a_deadline_is_an_is_error_result(state_dir: Path) -> None:
    config = echo_config(
        state_dir,
        "--tokens",
        "50",
        "--token-delay",
        "0.2",
        server={"stream_idle_timeout": 0.1},
    )
    async with running_daemon(config) as (info, _), mcp_session(info.url) as session:
        result = await session.call_tool("chat", {"model": "echo", "prompt": "hi"})
        assert result.is_error, result
        assert "stream_idle_timeout" in result.content[0].text  # type: ignore[union-attr]


async def test_admin_tools_only_in_an_admin_session(state_dir: Path) -> None:
    config = echo_config(state_dir)
    async with (
        running_daemon(config, admin=True) as (info, client),
        mcp_session(info.url) as user,
        mcp_session(info.url, admin_token(state_dir)) as admin,
    ):
        user_tools = {t.name for t in (await user.list_tools()).tools}
        admin_tools = {t.name for t in (await admin.list_tools()).tools}
        assert "load_model" not in user_tools and "unload_model" not in user_tools
        assert {"load_model", "unload_model"} <= admin_tools
        refused = await user.call_tool("load_model", {"name": "echo"})
        assert refused.is_error
        assert refused.content[0].text == "Unknown tool: load_model"  # type: ignore[union-attr]
        templates = (await user.list_resource_templates()).resource_templates
        assert templates == []
        loaded = await admin.call_tool("load_model", {"name": "echo"})
        assert not loaded.is_error, loaded
        assert (await client.get("/admin/status")).json()["models"]["echo"]["state"] == "ready"
        # An admin session's model calls are the reserved user "admin".
        said = await admin.call_tool("chat", {"model": "echo", "prompt": "hi"})
        assert not said.is_error
        metrics = (await client.get("/metrics")).text
        assert (
            'trioserve_user_requests_total{model="echo",status="200",user="admin"} 1.0' in metrics
        )
        users = (await client.get("/admin/status")).json()["users"]
        assert users["admin"]["requests"] == 1 and users["anonymous"]["requests"] == 0
        logs = await admin.read_resource("trioserve://models/echo/logs")
        assert logs.contents
        with pytest.raises(MCPError):
            await user.read_resource("trioserve://models/echo/logs")
        unloaded = await admin.call_tool("unload_model", {"name": "echo"})
        assert not unloaded.is_error, unloaded


async def test_the_key_decides_the_user_and_a_wrong_key_gets_401(state_dir: Path) -> None:
    config = echo_config(state_dir)
    config = config.model_copy(
        update={"users": {"alice": config.users.get("x") or _user("sk-alice")}}
    )
    async with running_daemon(config, admin=True) as (info, client):
        async with httpx.AsyncClient(base_url=info.url) as raw:
            answer = await raw.post(
                "/mcp",
                headers={
                    "authorization": "Bearer wrong",
                    "accept": "application/json, text/event-stream",
                },
                json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
            )
        assert answer.status_code == 401
        assert answer.json()["error"]["code"] == "invalid_api_key"
        async with mcp_session(info.url, "sk-alice") as session:
            result = await session.call_tool("chat", {"model": "echo", "prompt": "hi"})
            assert not result.is_error, result
        users = (await client.get("/admin/status")).json()["users"]
        assert users["alice"]["requests"] == 1
        await trio.lowlevel.checkpoint()


def _user(key: str) -> object:
    from trioserve.config import UserConfig

    return UserConfig.model_validate({"api_keys": [key]})


async def test_a_2026_07_28_client_calls_chat(state_dir: Path) -> None:
    """``mcp.Client`` negotiates the stateless 2026-07-28 era (no session, server/discover)."""
    async with (
        running_daemon(echo_config(state_dir)) as (info, _),
        Client(info.url + "/mcp") as client,
    ):
        assert client.protocol_version == "2026-07-28"
        tools = {tool.name for tool in (await client.list_tools()).tools}
        assert tools == {"chat", "embed", "models"}
        result = await client.call_tool("chat", {"model": "echo", "prompt": "hi"})
        assert not result.is_error, result


async def test_open_admin_keeps_a_users_calls_its_own(state_dir: Path) -> None:
    """With ``admin_over_tcp = "open"`` everyone is admin, but only an admin credential makes
    calls count as ``admin``: alice's key keeps her calls hers (her budgets, her share)."""
    config = echo_config(state_dir, server={"admin_over_tcp": "open"})
    config = config.model_copy(
        update={"users": {"alice": UserConfig(api_keys=["sk-alice"], max_requests_per_minute=1)}}
    )
    async with running_daemon(config, admin=True) as (info, client):
        async with mcp_session(info.url, "sk-alice") as session:
            tools = {tool.name for tool in (await session.list_tools()).tools}
            assert "load_model" in tools  # admin, as the open mode says
            said = await session.call_tool("chat", {"model": "echo", "prompt": "hi"})
            assert not said.is_error, said
            # Her budget applies: a second call in the minute is refused.
            again = await session.call_tool("chat", {"model": "echo", "prompt": "hi"})
            assert again.is_error, again
        users = (await client.get("/admin/status")).json()["users"]
        assert users["alice"]["requests"] == 1
        assert "admin" not in users


async def test_a_user_session_sees_no_more_of_a_model_than_a_user_should(
    state_dir: Path,
) -> None:
    """A failed model's last error holds its process's last lines (they can hold prompt
    text): a user session gets the first line, an admin session all of it, with pid and port."""
    script = "import sys; print('secret prompt text'); sys.exit('load failed: out of memory')"
    config = echo_config(state_dir)
    config = config.model_copy(
        update={
            "models": {
                **config.models,
                "broken": config.models["echo"].model_copy(
                    update={"cmd": ["{python}", "-c", script]}
                ),
            }
        }
    )
    async with running_daemon(config, admin=True) as (info, client):
        await client.post("/admin/models/broken/load")
        async with (
            mcp_session(info.url) as user,
            mcp_session(info.url, admin_token(state_dir)) as admin,
        ):
            for session, whole in ((user, False), (admin, True)):
                read = await session.read_resource("trioserve://status")
                text = read.contents[0].text  # type: ignore[union-attr]
                broken = json.loads(text)["models"]["broken"]
                assert broken["state"] == "failed"
                assert ("secret prompt text" in broken["last_error"]) is whole, broken
                assert ("pid" in broken) is whole, broken
            listed = await user.call_tool("models", {})
            assert listed.structured_content is not None
            shown = listed.structured_content["models"]["broken"]["last_error"]
            assert "\n" not in shown and "secret prompt text" not in shown, shown


async def test_progress_comes_every_second_even_when_tokens_do_not(state_dir: Path) -> None:
    """A model slower than a token a second, behind a daemon whose relay says nothing while it
    waits (``loading_progress = false``): the call still reports at least once a second —
    more notifications than tokens, every value rising, none past the tokens made."""
    config = echo_config(
        state_dir,
        "--tokens",
        "3",
        "--token-delay",
        "1.6",
        server={"loading_progress": False},
    )
    received: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        received.append((progress, total, message))

    async with running_daemon(config) as (info, _), mcp_session(info.url) as session:
        result = await session.call_tool(
            "chat",
            {"model": "echo", "prompt": "hi", "max_tokens": 3},
            progress_callback=on_progress,
        )
    assert not result.is_error, result
    # ~5 s of call (the model's start, then 3 tokens 1.6 s apart): a report a second at least.
    assert len(received) >= 4, received
    values = [value for value, _, _ in received]
    assert values == sorted(set(values)), received
    assert values[-1] < 4, received
    assert any(message and "waiting for model echo" in message for _, _, message in received)
