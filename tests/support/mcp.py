"""MCP clients for tests: the SDK's own ``ClientSession`` over Streamable HTTP (``httpx2``, the
SDK's HTTP client), and configs with an ``[mcp]`` section."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx2
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from trioserve.config import Config, McpConfig


def with_mcp(config: Config, **mcp: Any) -> Config:
    """``config`` with ``[mcp]`` settings ``mcp`` (validated)."""
    return config.model_copy(update={"mcp": McpConfig.model_validate(mcp)})


def key_headers(key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"} if key else {}


def mcp_http_client(key: str | None = None, **client: Any) -> httpx2.AsyncClient:
    """The SDK's HTTP client as the tests use it: ``key``'s headers, long reads, and a connect
    retried twice. The retries: a session's closing DELETE is the SDK's best effort (it logs a
    failure and goes on), and one failed connect on a busy CI machine once left a session open
    that a test then waited for in vain (``test_ui_browser``'s live MCP line)."""
    return httpx2.AsyncClient(
        headers=key_headers(key),
        timeout=httpx2.Timeout(30, read=300),
        transport=httpx2.AsyncHTTPTransport(retries=2),
        **client,
    )


@asynccontextmanager
async def mcp_session(
    url: str, key: str | None = None, **session: Any
) -> AsyncIterator[ClientSession]:
    """An initialized session (handshake versions: 2025-11-25) on ``url``/mcp with ``key``."""
    http = mcp_http_client(key)
    async with (
        http,
        streamable_http_client(url + "/mcp", http_client=http) as (read, write),
        ClientSession(read, write, **session) as client,
    ):
        await client.initialize()
        yield client
