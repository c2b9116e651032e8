"""The MCP endpoint ``/mcp`` (issue 23): the official SDK's Streamable HTTP session manager
behind trioserve's own entry; tools that go through the relay exactly as ``/v1`` does."""

from trioserve.mcp.endpoint import McpEndpoint

__all__ = ["McpEndpoint"]
