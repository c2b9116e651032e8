"""/mcp sessions with the SDK's own client: bound to their key, bounded, ended by DELETE;
cancellation reaching the model; no call waiting behind another; a reload announced;
asyncio clients as well as trio ones."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import anyio
import httpx
import mcp_types
import trio

from tests.support.config import echo_cmd, echo_config, make_config, write_config
from tests.support.daemon import running_daemon
from tests.support.mcp import mcp_session, with_mcp
from tests.support.ports import free_port
from tests.support.processes import trio_task_count
from tests.support.status import load_model, wait_for_stats, wait_for_status
from trioserve.config import load_config

_ACCEPT = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
_INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "raw", "version": "0"},
    },
}


async def _open_raw(url: str, key: str | None) -> tuple[int, str | None, httpx.Headers]:
    headers = {**_ACCEPT, **({"authorization": f"Bearer {key}"} if key else {})}
    async with httpx.AsyncClient() as raw:
        answer = await raw.post(url + "/mcp", headers=headers, json=_INIT)
    return answer.status_code, answer.headers.get("mcp-session-id"), answer.headers


async def test_a_session_belongs_to_the_key_that_opened_it(state_dir: Path) -> None:
    config = make_config(state_dir, server={"api_keys": ["key-a", "key-b"]})
    async with running_daemon(config) as (info, _):
        status, session_id, _ = await _open_raw(info.url, "key-a")
        assert status == 200 and session_id
        ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
        async with httpx.AsyncClient() as raw:
            for key, expected in (("key-b", 404), ("key-a", 200)):
                headers = {
                    **_ACCEPT,
                    "authorization": f"Bearer {key}",
                    "mcp-session-id": session_id,
                    "mcp-protocol-version": "2025-11-25",
                }
                answer = await raw.post(info.url + "/mcp", headers=headers, json=ping)
                assert answer.status_code == expected, (key, answer.text)


async def test_beyond_max_sessions_503_with_retry_after(state_dir: Path) -> None:
    config = with_mcp(make_config(state_dir), max_sessions=1)
    async with (
        running_daemon(config, admin=True) as (info, client),
        mcp_session(info.url) as session,
    ):
        await session.send_ping()
        status, _, headers = await _open_raw(info.url, None)
        assert status == 503
        assert headers["retry-after"] == "5"
        mcp_counts = (await client.get("/admin/status")).json()["mcp"]
        assert mcp_counts == {"sessions": 1, "calls_in_flight": 0}
        assert "trioserve_mcp_sessions 1.0" in (await client.get("/metrics")).text


async def test_mcp_off_answers_404(state_dir: Path) -> None:
    config = with_mcp(make_config(state_dir), enabled=False)
    async with running_daemon(config) as (info, client):
        status, _, _ = await _open_raw(info.url, None)
        assert status == 404
        assert (await client.get("/admin/status")).json()["mcp"] is None


async def test_a_foreign_origin_is_refused_on_get_too(state_dir: Path) -> None:
    async with running_daemon(make_config(state_dir)) as (info, _), httpx.AsyncClient() as raw:
        answer = await raw.get(
            info.url + "/mcp",
            headers={"origin": "http://evil.example.com", "accept": "text/event-stream"},
        )
        assert answer.status_code == 403
        assert answer.json()["error"]["code"] == "forbidden"


async def _call_and_cancel(url: str, port: int) -> None:
    """A chat call the client cancels (the SDK's notifications/cancelled) while the model
    generates."""
    async with mcp_session(url) as session, trio.open_nursery() as nursery:

        async def call() -> None:
            await session.call_tool("chat", {"model": "echo", "prompt": "hi"})

        nursery.start_soon(call)
        await wait_for_stats(port, "started", 1)
        nursery.cancel_scope.cancel()


async def test_a_cancel_from_the_client_aborts_the_upstream_request(state_dir: Path) -> None:
    config = echo_config(state_dir, "--tokens", "400", "--token-delay", "0.05")
    async with running_daemon(config, admin=True) as (info, client):
        port = (await load_model(client, "echo"))["port"]
        await _call_and_cancel(info.url, port)
        stats = await wait_for_stats(port, "cancelled", 1)
        assert stats["completed"] == 0
        await wait_for_status(client, "echo", "in_flight", 0)
        # The relay saw it as an HTTP client's hang-up: the same path, the same count.
        metrics = (await client.get("/metrics")).text
        assert 'trioserve_upstream_cancellations_total{model="echo"} 1.0' in metrics


async def test_delete_ends_the_session_and_its_call(state_dir: Path) -> None:
    config = echo_config(state_dir, "--tokens", "400", "--token-delay", "0.05")
    async with running_daemon(config, admin=True) as (info, client):
        port = (await load_model(client, "echo"))["port"]
        headers = {**_ACCEPT}
        _status, session_id, _ = await _open_raw(info.url, None)
        assert session_id
        headers.update({"mcp-session-id": session_id, "mcp-protocol-version": "2025-11-25"})
        call = {
            "jsonrpc": "2.0",
            "id": 3,
            "method": "tools/call",
            "params": {"name": "chat", "arguments": {"model": "echo", "prompt": "hi"}},
        }
        async with httpx.AsyncClient(timeout=30) as raw, trio.open_nursery() as nursery:

            async def post() -> None:
                async with raw.stream("POST", info.url + "/mcp", headers=headers, json=call) as r:
                    async for _ in r.aiter_bytes():
                        pass

            nursery.start_soon(post)
            await wait_for_stats(port, "started", 1)
            deleted = await raw.delete(info.url + "/mcp", headers=headers)
            assert deleted.status_code == 200
            stats = await wait_for_stats(port, "cancelled", 1)
            assert stats["completed"] == 0
        # No session, no call is left; the id is gone.
        counts = (await client.get("/admin/status")).json()["mcp"]
        assert counts == {"sessions": 0, "calls_in_flight": 0}
        async with httpx.AsyncClient() as raw:
            ping = {"jsonrpc": "2.0", "id": 4, "method": "ping"}
            again = await raw.post(info.url + "/mcp", headers=headers, json=ping)
            assert again.status_code == 404


async def test_a_vanished_client_cancels_its_call(state_dir: Path) -> None:
    """The work-around (trioserve/mcp/gone.py): a 2025-era POST whose connection closes
    without notifications/cancelled; the SDK alone would let the model generate on."""
    config = echo_config(state_dir, "--tokens", "400", "--token-delay", "0.05")
    async with running_daemon(config, admin=True) as (info, client):
        port = (await load_model(client, "echo"))["port"]
        _, session_id, _ = await _open_raw(info.url, None)
        assert session_id
        headers = {**_ACCEPT, "mcp-session-id": session_id, "mcp-protocol-version": "2025-11-25"}
        call = {
            "jsonrpc": "2.0",
            "id": 3,
            "method": "tools/call",
            "params": {"name": "chat", "arguments": {"model": "echo", "prompt": "hi"}},
        }
        async with (
            httpx.AsyncClient(timeout=30) as raw,
            raw.stream("POST", info.url + "/mcp", headers=headers, json=call),
        ):
            await wait_for_stats(port, "started", 1)
            # The response closed with its connection: the client is gone.
        stats = await wait_for_stats(port, "cancelled", 1)
        assert stats["completed"] == 0


async def test_ping_is_answered_while_16_calls_generate(state_dir: Path) -> None:
    config = echo_config(state_dir, "--tokens", "100", "--token-delay", "0.05", max_concurrency=16)
    async with running_daemon(config, admin=True) as (info, client):
        port = (await load_model(client, "echo"))["port"]
        async with mcp_session(info.url) as session, trio.open_nursery() as nursery:
            for _ in range(16):
                nursery.start_soon(session.call_tool, "chat", {"model": "echo", "prompt": "x"})
            await wait_for_stats(port, "started", 16)
            await session.send_ping()
            listed = await session.list_tools()
            assert listed.tools
            # Answered while every call still generates: none of them has finished.
            assert (await wait_for_stats(port, "started", 16))["completed"] == 0
            nursery.cancel_scope.cancel()


async def test_a_reload_that_adds_a_model_sends_tools_list_changed(
    tmp_path: Path, state_dir: Path
) -> None:
    path, port = tmp_path / "c.toml", free_port()
    write_config(path, state_dir, port, {"echo": {"cmd": echo_cmd()}}, mcp=None)
    changed = trio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, mcp_types.ToolListChangedNotification):
            changed.set()

    async with (
        running_daemon(load_config(path), admin=True) as (info, client),
        mcp_session(info.url, message_handler=on_message) as session,
    ):
        before = {t.name: t for t in (await session.list_tools()).tools}
        assert before["chat"].input_schema["properties"]["model"]["enum"] == ["echo"]
        models = {"echo": {"cmd": echo_cmd()}, "second": {"cmd": echo_cmd()}}
        write_config(path, state_dir, port, models, mcp=None)
        assert (await client.post("/admin/reload")).status_code == 200
        with trio.fail_after(10):
            await changed.wait()
        after = {t.name: t for t in (await session.list_tools()).tools}
        assert after["chat"].input_schema["properties"]["model"]["enum"] == ["echo", "second"]


def _asyncio_client(url: str) -> tuple[str, bool]:
    async def main() -> tuple[str, bool]:
        async with mcp_session(url) as session:
            await session.send_ping()
            result = await session.call_tool("chat", {"model": "echo", "prompt": "hi"})
            return result.content[0].text, bool(result.is_error)  # type: ignore[union-attr]

    return asyncio.run(main())


async def test_an_asyncio_client(state_dir: Path) -> None:
    async with running_daemon(echo_config(state_dir)) as (info, _):
        text, is_error = await trio.to_thread.run_sync(_asyncio_client, info.url)
        assert not is_error and text
        assert anyio  # the SDK's client runs on anyio under either loop


async def test_an_idle_session_expires_and_leaves_nothing(state_dir: Path) -> None:
    """``[mcp] session_idle_timeout``: a session nobody uses is closed (its id then gets 404)
    and its tasks are gone."""
    config = with_mcp(make_config(state_dir), session_idle_timeout=0.5)
    async with running_daemon(config) as (info, client):
        # No keep-alive connection of the test's own among the tasks counted.
        client.headers["connection"] = "close"
        await client.get("/admin/status")
        before = await _settled_task_count()
        status, session_id, _ = await _open_raw(info.url, None)
        assert status == 200 and session_id
        with trio.fail_after(20):
            while (await client.get("/admin/status")).json()["mcp"]["sessions"]:
                # The expiry happens in the daemon's own time: its status is the event.
                await trio.sleep(0.05)
        ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
        headers = {**_ACCEPT, "mcp-session-id": session_id, "mcp-protocol-version": "2025-11-25"}
        async with httpx.AsyncClient(headers={"connection": "close"}) as raw:
            answer = await raw.post(info.url + "/mcp", headers=headers, json=ping)
        assert answer.status_code == 404
        assert await _settled_task_count(at_most=before) <= before


async def _settled_task_count(at_most: int | None = None) -> int:
    """This run's task count once connections just closed have ended (bounded): the count
    reaches ``at_most``, or stops changing."""
    count = trio_task_count()
    with trio.move_on_after(5):
        while True:
            await trio.sleep(0.05)
            now = trio_task_count()
            if (at_most is not None and now <= at_most) or (at_most is None and now == count):
                return now
            count = now
    return trio_task_count()
