"""The MCP SDK insides trioserve relies on (trioserve/mcp/sessions.py: one subclass of the
session manager; endpoint.py and resources.py: ``MCPServer._lowlevel_server``) are what they
were written against. Each failure names what changed and what to re-check."""

from __future__ import annotations

import ast
import hashlib
import inspect
import textwrap
from importlib.metadata import version

import pytest
from mcp.server.lowlevel.server import Server
from mcp.server.mcpserver import MCPServer
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

from trioserve.mcp.sessions import SDK_FINGERPRINTS, Sessions, TrioserveSessionManager


def _fingerprint(obj: object) -> str:
    source = textwrap.dedent(inspect.getsource(obj))  # type: ignore[arg-type]
    return hashlib.sha256(ast.dump(ast.parse(source)).encode()).hexdigest()


@pytest.mark.parametrize("name", sorted(SDK_FINGERPRINTS))
def test_the_sdk_code_the_subclass_relies_on_is_unchanged(name: str) -> None:
    _, method = name.split(".")
    found = _fingerprint(getattr(StreamableHTTPSessionManager, method))
    assert found == SDK_FINGERPRINTS[name], (
        f"mcp {version('mcp')}: {name} changed since mcp 2.3.0. Re-read it and check "
        "trioserve/mcp/sessions.py TrioserveSessionManager (_discard_session override: is it "
        "still called at every end of a session? open_sessions: is _server_instances still "
        f"the map of open sessions?), then update SDK_FINGERPRINTS[{name!r}] to {found}."
    )


def test_the_private_names_used_exist() -> None:
    manager = TrioserveSessionManager(Sessions(), app=Server("x"))
    assert isinstance(manager._server_instances, dict), (
        "StreamableHTTPSessionManager._server_instances is no longer a dict: open_sessions "
        "in trioserve/mcp/sessions.py counts it"
    )
    assert manager.open_sessions == 0
    params = inspect.signature(StreamableHTTPSessionManager._discard_session).parameters
    assert list(params) == ["self", "session_id", "transport"], (
        "StreamableHTTPSessionManager._discard_session's parameters changed: "
        "TrioserveSessionManager._discard_session overrides it"
    )
    server = MCPServer("x", log_level="WARNING")
    assert isinstance(server._lowlevel_server, Server), (
        "MCPServer._lowlevel_server is gone or no longer the low-level Server: "
        "trioserve/mcp/endpoint.py (the manager's app) and resources.py (add_request_handler) "
        "use it"
    )
