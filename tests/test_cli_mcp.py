"""``trioserve mcp``: the installed console script as a subprocess, spoken to with the MCP SDK's
own stdio client (``ClientSession`` at the handshake versions, ``mcp.Client`` at 2026-07-28)
and, where exit codes and stdout byte by byte matter, over raw pipes; against a real daemon
(``trioserve start``) whose model is the echo backend."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from mcp import Client, ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.shared.dispatcher import ProgressFnT

from tests.support.config import daemon_config, echo_cmd
from tests.support.daemon import TRIOSERVE_BIN, DaemonProcess, clean_env
from tests.support.ports import free_port

KEY = "sk-mcp-user"
# 1000 tokens at 50 ms each: a call runs as long as its max_tokens says (20 tokens: 1 s).
ECHO = echo_cmd("--tokens", "1000", "--token-delay", "0.05")
# Long enough never to end by itself while a test acts on it; the tests cancel it.
SLOW_TOKENS = 400
# Another process: polled until it shows what the test waits for, within this bound.
SETTLE = 10.0


@pytest.fixture
def daemon(tmp_path: Path, spawn_daemon: Any) -> DaemonProcess:
    config, url = daemon_config(
        tmp_path / "c.toml",
        tmp_path / "state",
        {"echo": {"cmd": ECHO}},
        server={"api_keys": [KEY]},
        mcp=None,
    )
    daemon: DaemonProcess = spawn_daemon(config, url)
    return daemon


def bridge_params(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> StdioServerParameters:
    """``trioserve mcp ARGS`` in ``tmp_path`` (no config of the repository's is found there)."""
    return StdioServerParameters(
        command=str(TRIOSERVE_BIN), args=["mcp", *args], env=env or {}, cwd=tmp_path
    )


@asynccontextmanager
async def handshake_session(params: StdioServerParameters) -> AsyncIterator[ClientSession]:
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        yield session


def chat_args(max_tokens: int) -> dict[str, Any]:
    return {"model": "echo", "prompt": "one two three", "max_tokens": max_tokens}


async def metric(daemon: DaemonProcess, name: str) -> float:
    """The sum of ``name``'s samples on the daemon's /metrics (0 with none yet)."""
    async with httpx.AsyncClient(base_url=daemon.url, trust_env=False) as http:
        text = (await http.get("/metrics", auth=daemon.admin)).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and line[len(name)] in " {"
    )


async def echo_cancelled(daemon: DaemonProcess) -> int:
    """Generations the echo model saw cancelled (its own /stats): the upstream request's end."""
    async with httpx.AsyncClient(trust_env=False) as http:
        status = (await http.get(f"{daemon.url}/admin/status", auth=daemon.admin)).json()
        port = status["models"]["echo"]["port"]
        stats = (await http.get(f"http://127.0.0.1:{port}/stats")).json()
    cancelled: int = stats["cancelled"]
    return cancelled


async def settled(probe: Callable[[], Awaitable[float]], value: float) -> None:
    """Wait until ``probe()`` (another process's figure) gives ``value``."""
    with trio.fail_after(SETTLE):
        while await probe() != value:
            await trio.sleep(0.05)  # another process: polling is the honest tool


MCP_SESSIONS = "trioserve_mcp_sessions"


async def cancel_on_first_progress(
    call: Callable[[ProgressFnT], Awaitable[Any]],
) -> list[float]:
    """Run ``call(progress_callback)`` and cancel it once its first progress arrived (the
    upstream request is generating then); the progress values it got."""
    seen: list[float] = []
    with trio.CancelScope() as scope:

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            seen.append(progress)
            scope.cancel()

        await call(on_progress)
    assert scope.cancelled_caught and seen
    return seen


# -- through the SDK's clients ---------------------------------------------------------------------


async def test_tools_and_a_chat_with_progress_through_the_bridge(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    params = bridge_params(tmp_path, "--url", daemon.url, "--api-key", KEY)
    async with handshake_session(params) as session:
        init = await session.initialize()
        assert init.protocol_version == "2025-11-25"
        assert init.server_info.name == "trioserve"
        tools = {tool.name for tool in (await session.list_tools()).tools}
        assert {"chat", "embed", "models"} <= tools
        assert not tools & {"load_model", "unload_model"}  # a user's key: no admin tools
        seen: list[tuple[float, float | None, str | None]] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            seen.append((progress, total, message))

        result = await session.call_tool("chat", chat_args(20), progress_callback=on_progress)
    assert not result.is_error
    assert result.structured_content is not None
    assert result.structured_content["model"] == "echo"
    assert result.structured_content["usage"]["completion_tokens"] == 20
    assert seen, "no progress notification came through the bridge"
    assert all(total == 20 for _, total, _ in seen)  # total = max_tokens


async def test_ping_is_answered_while_a_slow_chat_generates(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    params = bridge_params(tmp_path, "--url", daemon.url, "--api-key", KEY)
    finished: list[str] = []
    async with handshake_session(params) as session:
        await session.initialize()
        generating = trio.Event()

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            generating.set()

        async def slow_chat() -> None:
            await session.call_tool("chat", chat_args(SLOW_TOKENS), progress_callback=on_progress)
            finished.append("chat")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_chat)
            await generating.wait()
            await session.send_ping()
            finished.append("ping")
            tools = await session.list_tools()
            finished.append("tools/list")
            nursery.cancel_scope.cancel()
    assert tools.tools
    assert finished == ["ping", "tools/list"]  # both answered; the chat had not finished


async def test_a_cancel_from_the_host_cancels_the_upstream_request(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    params = bridge_params(tmp_path, "--url", daemon.url, "--api-key", KEY)
    async with handshake_session(params) as session:
        await session.initialize()
        await cancel_on_first_progress(
            lambda progress: session.call_tool(
                "chat", chat_args(SLOW_TOKENS), progress_callback=progress
            )
        )
        # notifications/cancelled went through: the daemon aborted the upstream request
        await settled(lambda: echo_cancelled(daemon), 1)
        # and the session goes on
        await session.send_ping()


async def test_a_2026_client_negotiates_it_and_its_cancel_passes_through(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    # The URL and key from the environment this time.
    params = bridge_params(tmp_path, env={"TRIOSERVE_URL": daemon.url, "TRIOSERVE_API_KEY": KEY})
    async with Client(params) as client:
        assert client.protocol_version == "2026-07-28"
        tools = {tool.name for tool in (await client.list_tools()).tools}
        assert "chat" in tools
        seen: list[float] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            seen.append(progress)

        result = await client.call_tool("chat", chat_args(20), progress_callback=on_progress)
        assert not result.is_error and seen
        # At 2026-07-28 a cancel closes the call's stream; the bridge must close its POST.
        await cancel_on_first_progress(
            lambda cb: client.call_tool("chat", chat_args(SLOW_TOKENS), progress_callback=cb)
        )
        await settled(lambda: echo_cancelled(daemon), 1)


# -- over raw pipes: stdout, exit codes, ending ---------------------------------------------------


class RawBridge:
    """``trioserve mcp`` with pipes of our own; every stdout line must be a JSON-RPC message."""

    def __init__(self, process: trio.Process, stderr: Path) -> None:
        self.process = process
        self.stderr_path = stderr
        self._buffer = b""

    @classmethod
    @asynccontextmanager
    async def run(cls, tmp_path: Path, *args: str) -> AsyncIterator[RawBridge]:
        stderr = tmp_path / "bridge.err"
        with stderr.open("wb") as err:
            process = await trio.lowlevel.open_process(
                [str(TRIOSERVE_BIN), "mcp", *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=clean_env(),
                cwd=tmp_path,
            )
        try:
            yield cls(process, stderr)
        finally:
            if process.returncode is None:
                process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()

    async def send(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(json.dumps(message).encode() + b"\n")

    async def receive(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self.process.stdout.receive_some()
            assert chunk, f"stdout closed; stderr: {self.stderr()}"
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        message: dict[str, Any] = json.loads(line)
        assert message.get("jsonrpc") == "2.0", line
        return message

    async def receive_until(self, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        while not check(message := await self.receive()):
            pass
        return message

    async def rest_of_stdout(self) -> bytes:
        assert self.process.stdout is not None
        rest = self._buffer
        while chunk := await self.process.stdout.receive_some():
            rest += chunk
        return rest

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    async def initialize(self) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(b"\n  \n")  # blank lines: skipped without a word
        await self.send(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-06-18",
                    "capabilities": {},
                    "clientInfo": {"name": "raw", "version": "1"},
                },
            }
        )
        answer = await self.receive()
        assert answer["id"] == 1 and answer["result"]["protocolVersion"] == "2025-06-18"
        await self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})


def run_bridge(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(TRIOSERVE_BIN), "mcp", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=tmp_path,
        timeout=60,
    )


@pytest.mark.parametrize("ending", ["eof", "SIGINT", "SIGTERM"])
async def test_the_host_leaving_ends_the_session_and_its_call_with_exit_0(
    daemon: DaemonProcess, tmp_path: Path, ending: str
) -> None:
    async with RawBridge.run(tmp_path, "--url", daemon.url, "--api-key", KEY) as bridge:
        await bridge.initialize()
        await bridge.send(
            {
                "jsonrpc": "2.0",
                "id": 2,
                "method": "tools/call",
                "params": {
                    "name": "chat",
                    "arguments": chat_args(SLOW_TOKENS),
                    "_meta": {"progressToken": "p"},
                },
            }
        )
        progress = await bridge.receive()
        assert progress["method"] == "notifications/progress", progress
        assert await metric(daemon, MCP_SESSIONS) == 1
        if ending == "eof":
            assert bridge.process.stdin is not None
            await bridge.process.stdin.aclose()
        else:
            bridge.process.send_signal(getattr(signal, ending))
        with trio.fail_after(SETTLE):
            code = await bridge.process.wait()
        assert code == 0, bridge.stderr()
        # What is left on stdout is whole JSON-RPC lines (the call's last progress, maybe).
        for line in (await bridge.rest_of_stdout()).splitlines():
            assert json.loads(line)["jsonrpc"] == "2.0"
        assert bridge.stderr() == ""
    # The bridge ended its session (DELETE /mcp), which cancelled the call upstream.
    await settled(lambda: metric(daemon, MCP_SESSIONS), 0)
    await settled(lambda: echo_cancelled(daemon), 1)


async def test_a_lost_daemon_ends_the_bridge_with_one_line_and_exit_1(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    async with RawBridge.run(tmp_path, "--url", daemon.url, "--api-key", KEY) as bridge:
        await bridge.initialize()
        daemon.stop()
        await bridge.send({"jsonrpc": "2.0", "id": 3, "method": "ping"})
        with trio.fail_after(SETTLE):
            code = await bridge.process.wait()
        assert code == 1
        assert (
            bridge.stderr()
            == f"trioserve: lost the daemon: no daemon answers at {daemon.url}/mcp\n"
        )


def test_no_daemon_is_one_line_on_stderr_and_exit_1(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = run_bridge(tmp_path, "--url", url)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == f"trioserve: no daemon answers at {url}/mcp\n"


def test_a_refused_key_is_one_line_on_stderr_and_exit_1(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    result = run_bridge(tmp_path, "--url", daemon.url, "--api-key", "sk-wrong")
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"trioserve: the daemon at {daemon.url}/mcp refused: "
    ), result.stderr


def test_mcp_turned_off_is_one_line_on_stderr_and_exit_1(tmp_path: Path, spawn_daemon: Any) -> None:
    config, url = daemon_config(
        tmp_path / "c.toml", tmp_path / "state", {"echo": {"cmd": ECHO}}, mcp={"enabled": False}
    )
    spawn_daemon(config, url)
    result = run_bridge(tmp_path, "--url", url)
    assert result.returncode == 1
    assert result.stderr == (
        f"trioserve: the daemon at {url}/mcp refused: /mcp is off ([mcp] enabled = false)\n"
    )
