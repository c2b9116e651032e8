"""/mcp's server-sent side with the SDK's own client, against an in-process daemon and echo:
resource subscriptions, log notifications, completion of the logs template, the drain hook at
a stop, cancellation of a 2026-07-28 call by closing its stream, progress while queued.

Notifications of a session arrive in order on its one GET stream, so a notification that did
*not* come is shown by a later one on the same stream that did (a witness), never by a sleep.
"""

from __future__ import annotations

import gc
import json
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx2
import mcp_types
import pytest
import trio
from mcp import Client, ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPDeprecationWarning, MCPError

from tests.support.admin import admin_token
from tests.support.config import echo_cmd, echo_config, make_config
from tests.support.daemon import LeakCheck, running_daemon
from tests.support.mcp import mcp_http_client
from tests.support.status import load_model, wait_for_stats, wait_for_status
from trioserve.mcp.resources import LOGS_TEMPLATE, STATUS_URI

# Only reached when something is broken: every wait below ends on an event long before.
WAIT = 15


class Inbox:
    """A session's ``message_handler``: every server notification, in arrival order, and
    waiting for one."""

    def __init__(self) -> None:
        self.messages: list[Any] = []
        self._arrived = trio.Event()

    async def __call__(self, message: Any) -> None:
        if isinstance(message, Exception):
            return  # a transport fault; the tests see its consequence instead
        self.messages.append(message)
        self._arrived.set()
        self._arrived = trio.Event()

    async def wait_for(self, wanted: Callable[[Any], bool], start: int = 0) -> int:
        """The index of the first message from ``start`` on that is ``wanted``, once it came."""
        with trio.fail_after(WAIT):
            while True:
                for index in range(start, len(self.messages)):
                    if wanted(self.messages[index]):
                        return index
                await self._arrived.wait()

    async def wait_for_count(self, wanted: Callable[[Any], bool], count: int, start: int) -> int:
        """The index of the ``count``-th ``wanted`` message from ``start`` on, once it came."""
        index = start - 1
        for _ in range(count):
            index = await self.wait_for(wanted, index + 1)
        return index

    def between(self, start: int, end: int, wanted: Callable[[Any], bool]) -> list[Any]:
        return [m for m in self.messages[start:end] if wanted(m)]


def is_status_update(message: Any) -> bool:
    return (
        isinstance(message, mcp_types.ResourceUpdatedNotification)
        and str(message.params.uri) == STATUS_URI
    )


def is_log(message: Any) -> bool:
    return isinstance(message, mcp_types.LoggingMessageNotification)


def log_of(model: str, to: str) -> Callable[[Any], bool]:
    """A log notification of ``model``'s lifecycle event into state ``to``."""

    def wanted(message: Any) -> bool:
        if not is_log(message):
            return False
        data = message.params.data
        return isinstance(data, dict) and data.get("model") == model and data.get("to") == to

    return wanted


@asynccontextmanager
async def listening_session(
    url: str, key: str | None = None, **http: Any
) -> AsyncIterator[tuple[ClientSession, Inbox]]:
    """An initialized 2025-11-25 session whose GET stream (where the server's notifications
    go: the SDK drops them while a session has none) is open, and its ``Inbox``."""
    inbox = Inbox()
    stream_open = trio.Event()

    async def on_response(response: httpx2.Response) -> None:
        if response.request.method == "GET" and response.status_code == 200:
            stream_open.set()

    client = mcp_http_client(key, event_hooks={"response": [on_response]})
    async with (
        client,
        streamable_http_client(url + "/mcp", http_client=client, **http) as (read, write),
        ClientSession(read, write, message_handler=inbox) as session,
    ):
        await session.initialize()
        with trio.fail_after(WAIT):
            await stream_open.wait()
        yield session, inbox


@contextmanager
def handshake_era() -> Iterator[None]:
    """For the client methods deprecated as of 2026-07-28 (``logging/setLevel``,
    ``resources/subscribe``): still the way at the handshake versions."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MCPDeprecationWarning)
        yield


async def set_level(session: ClientSession, level: mcp_types.LoggingLevel) -> None:
    with handshake_era():
        await session.set_logging_level(level)


async def subscribe(session: ClientSession, uri: str) -> None:
    with handshake_era():
        await session.subscribe_resource(uri)


async def unsubscribe(session: ClientSession, uri: str) -> None:
    with handshake_era():
        await session.unsubscribe_resource(uri)


async def unload(client: Any, model: str) -> None:
    answer = await client.post(f"/admin/models/{model}/unload")
    assert answer.status_code == 200, answer.text


# -- 1. resources/subscribe ----------------------------------------------------------------------


async def test_a_subscription_to_status_gets_updates_until_unsubscribed(state_dir: Path) -> None:
    async with (
        running_daemon(echo_config(state_dir), admin=True) as (info, client),
        listening_session(info.url) as (session, inbox),
    ):
        # The lifecycle's log notifications are the witness: for each event the status update
        # is sent first, then the log, on the same stream.
        await set_level(session, "info")
        await subscribe(session, STATUS_URI)
        await load_model(client, "echo")
        ready = await inbox.wait_for(log_of("echo", "ready"))
        # stopped -> starting -> ready: an update for each.
        assert len(inbox.between(0, ready, is_status_update)) == 2, inbox.messages
        assert inbox.between(0, ready, is_log)  # the witness works

        await unsubscribe(session, STATUS_URI)
        mark = len(inbox.messages)
        await unload(client, "echo")
        stopped = await inbox.wait_for(log_of("echo", "stopped"), mark)
        # ready -> stopping -> stopped came and went: no update for either.
        assert inbox.between(mark, stopped, log_of("echo", "stopping"))
        assert inbox.between(mark, stopped + 1, is_status_update) == []


# -- 2. logging/setLevel -------------------------------------------------------------------------


async def test_log_notifications_of_lifecycle_events_follow_the_level(state_dir: Path) -> None:
    async with (
        running_daemon(echo_config(state_dir), admin=True) as (info, client),
        listening_session(info.url) as (session, inbox),
    ):
        # Status updates are the witness of what the logs would have been sent among.
        await subscribe(session, STATUS_URI)
        await set_level(session, "info")
        await load_model(client, "echo")
        ready = await inbox.wait_for(log_of("echo", "ready"))
        logs = inbox.between(0, ready + 1, is_log)
        assert [m.params.data["to"] for m in logs] == ["starting", "ready"], logs
        for message in logs:
            assert message.params.level == "info"
            assert message.params.logger == "trioserve"
            assert message.params.data["event"] == "model"
            assert message.params.data["from"] in ("stopped", "starting")

        # Lifecycle events are "info": a session that asks for "warning" and above gets none.
        await set_level(session, "warning")
        mark = len(inbox.messages)
        await unload(client, "echo")
        await load_model(client, "echo")
        # stopping, stopped, starting, ready: the fourth update comes after the logs of the
        # first three would have.
        fourth = await inbox.wait_for_count(is_status_update, 4, mark)
        assert inbox.between(mark, fourth, is_log) == [], inbox.messages[mark:]

        # And "debug" (below "info") gets them again.
        await set_level(session, "debug")
        await unload(client, "echo")
        await inbox.wait_for(log_of("echo", "stopped"), fourth)


# -- 3. completion of {name} ---------------------------------------------------------------------


async def test_completion_of_the_logs_template_only_for_admin(state_dir: Path) -> None:
    models = {name: {"cmd": echo_cmd()} for name in ("echo", "embedder", "other")}
    logs = mcp_types.ResourceTemplateReference(uri=LOGS_TEMPLATE)
    async with (
        running_daemon(make_config(state_dir, models)) as (info, _),
        listening_session(info.url, admin_token(state_dir)) as (admin, _),
        listening_session(info.url) as (user, _),
    ):

        async def names(session: ClientSession, prefix: str) -> list[str]:
            found = await session.complete(logs, {"name": "name", "value": prefix})
            return list(found.completion.values)

        assert await names(admin, "e") == ["echo", "embedder"]
        assert await names(admin, "ot") == ["other"]
        assert await names(admin, "") == ["echo", "embedder", "other"]
        assert await names(admin, "x") == []
        # Model logs (and so their names here) are for admin sessions only.
        assert await names(user, "e") == []
        assert await names(user, "") == []


# -- 4. the drain hook ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "grace", "answered"),
    [
        # The stop takes ~1.5 s whatever the grace: a large one costs nothing.
        pytest.param(20, 10.0, True, id="call-ends-in-the-drain"),
        # The drain takes half the grace, then the call is cancelled: ~3 s.
        pytest.param(2000, 6.0, False, id="call-outlasts-the-drain"),
    ],
)
async def test_a_stop_ends_open_sessions_and_leaves_nothing(
    state_dir: Path, tokens: int, grace: float, answered: bool
) -> None:
    """A session with its GET stream open and a call in flight when the daemon is asked to
    stop. The drain counts MCP POSTs: a call that ends within it gets its answer; one that
    does not is cancelled when it ends. The drain's end ends the session (a GET stream never
    ends by itself and would hold the stop for the whole ``shutdown_grace``), and nothing of
    either is left. The client reconnects its GET stream at once, on a keep-alive connection
    of an earlier answer: one that Hypercorn did not finish recycling would hold the stop too
    (``McpEndpoint.__call__``: the last send is shielded)."""
    config = echo_config(
        state_dir,
        "--tokens",
        str(tokens),
        "--token-delay",
        "0.05",
        server={"shutdown_grace": grace},
    )
    check = LeakCheck()
    release = trio.Event()
    results: list[mcp_types.CallToolResult] = []
    errors: list[MCPError] = []
    async with trio.open_nursery() as clients:
        async with running_daemon(config, admin=True) as (info, client):
            check.instance = info.instance
            port = (await load_model(client, "echo"))["port"]

            async def use_a_session(task_status: trio.TaskStatus[None]) -> None:
                async with (
                    listening_session(info.url, terminate_on_close=False) as (session, _),
                    trio.open_nursery() as calls,
                ):

                    async def call() -> None:
                        chat = {"model": "echo", "prompt": "hi"}
                        try:
                            results.append(await session.call_tool("chat", chat))
                        except MCPError as exc:
                            # The answer's stream ended without one: the call was cancelled.
                            errors.append(exc)

                    calls.start_soon(call)
                    await wait_for_stats(port, "started", 1)
                    task_status.started()
                    # Until the daemon is gone (no DELETE to send then).
                    await release.wait()
                    calls.cancel_scope.cancel()

            await clients.start(use_a_session)
            asked = trio.current_time()
        stopped_after = trio.current_time() - asked
        release.set()
    gc.collect()  # the SDK's SSE readers are left to the garbage collector
    await check.verify()
    if answered:
        assert len(results) == 1 and not results[0].is_error, (results, errors)
    else:
        assert len(errors) == 1 and not results, (results, errors)
    # Generous: a stop held by the GET stream (or the call) takes the whole grace.
    assert stopped_after < grace, stopped_after


async def test_a_stop_ends_a_2026_07_28_listen_stream(state_dir: Path) -> None:
    """A 2026-07-28 client's ``subscriptions/listen`` is a POST whose answer never ends by
    itself, handled in its HTTP request's own task: the drain must not wait for it, and the
    end of the drain must end it, or it holds the stop for the whole ``shutdown_grace``."""
    grace = 20.0
    config = echo_config(state_dir, server={"shutdown_grace": grace})
    check = LeakCheck()
    release = trio.Event()
    ended = trio.Event()
    async with trio.open_nursery() as clients:
        async with running_daemon(config) as (info, _):
            check.instance = info.instance

            async def listen(task_status: trio.TaskStatus[None]) -> None:
                http = mcp_http_client()
                try:
                    async with (
                        http,
                        Client(streamable_http_client(info.url + "/mcp", http_client=http)) as c,
                    ):
                        assert c.protocol_version == "2026-07-28"
                        async with c.listen(tools_list_changed=True) as subscription:
                            task_status.started()
                            async for _ in subscription:
                                pass
                except Exception:  # the stream cut by the stop: what the test waits for
                    pass
                finally:
                    ended.set()
                await release.wait()

            await clients.start(listen)
            asked = trio.current_time()
        stopped_after = trio.current_time() - asked
        with trio.fail_after(10):
            await ended.wait()
        release.set()
    gc.collect()
    await check.verify()
    # Generous: a stop held by the listen stream takes the whole grace (20 s) and more.
    assert stopped_after < grace / 2, stopped_after


# -- 5. 2026-07-28: a cancel closes the response stream ------------------------------------------


async def test_a_2026_07_28_cancel_closes_the_stream_and_aborts_upstream(state_dir: Path) -> None:
    config = echo_config(state_dir, "--tokens", "400", "--token-delay", "0.05")
    posted: list[Any] = []

    async def on_request(request: httpx2.Request) -> None:
        if request.method == "POST":
            posted.append(json.loads(request.content))

    http = mcp_http_client(event_hooks={"request": [on_request]})
    async with (
        running_daemon(config, admin=True) as (info, client),
        http,
        Client(streamable_http_client(info.url + "/mcp", http_client=http)) as mcp_client,
    ):
        assert mcp_client.protocol_version == "2026-07-28"
        port = (await load_model(client, "echo"))["port"]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(mcp_client.call_tool, "chat", {"model": "echo", "prompt": "hi"})
            await wait_for_stats(port, "started", 1)
            nursery.cancel_scope.cancel()
        stats = await wait_for_stats(port, "cancelled", 1)
        assert stats["completed"] == 0
        # The stream's close was the cancel: 2026-07-28 has no notifications/cancelled.
        methods = [message.get("method") for message in posted]
        assert "tools/call" in methods and "notifications/cancelled" not in methods, methods
        # The client goes on.
        after = await mcp_client.call_tool("models", {})
        assert not after.is_error, after


# -- 6. progress while queued --------------------------------------------------------------------


async def test_progress_while_a_call_waits_for_a_busy_slot(state_dir: Path) -> None:
    config = echo_config(state_dir, "--tokens", "400", "--token-delay", "0.05", max_concurrency=1)
    reports: list[tuple[float, float | None, str | None]] = []
    waiting = trio.Event()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        reports.append((progress, total, message))
        if message and "waiting" in message:
            waiting.set()

    async with (
        running_daemon(config, admin=True) as (info, client),
        listening_session(info.url) as (session, _),
    ):
        port = (await load_model(client, "echo"))["port"]
        async with trio.open_nursery() as nursery:
            # The first call holds the one slot for 20 s.
            nursery.start_soon(session.call_tool, "chat", {"model": "echo", "prompt": "first"})
            await wait_for_stats(port, "started", 1)

            async def second() -> None:
                args: dict[str, Any] = {"model": "echo", "prompt": "second", "max_tokens": 50}
                await session.call_tool("chat", args, progress_callback=on_progress)

            nursery.start_soon(second)
            with trio.fail_after(WAIT):
                await waiting.wait()
            # Its own generation has not begun: the backend still has one request, and no
            # progress counted a token.
            stats = await wait_for_stats(port, "started", 1)
            assert stats["started"] == 1, stats
            # Waiting: below the first token, and rising with each message.
            assert all(0 < value < 1 for value, _, _ in reports), reports
            values = [value for value, _, _ in reports]
            assert values == sorted(set(values)), reports
            assert any(message and "echo" in message for _, _, message in reports), reports
            nursery.cancel_scope.cancel()
        # Both cancels were handled before the session ends (its DELETE would race them).
        await wait_for_stats(port, "cancelled", 1)
        await wait_for_status(client, "echo", "queued", 0)
        await wait_for_status(client, "echo", "in_flight", 0)
