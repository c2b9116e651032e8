"""Helpers for the gateway tests: backend stats, SSE reading, status polling."""

from __future__ import annotations

import textwrap
from contextlib import aclosing
from typing import Any

import httpx
import trio


def chat(
    model: str = "echo", *, stream: bool = False, text: str = "a b c", **extra: Any
) -> dict[str, Any]:
    return {
        "model": model,
        "stream": stream,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


async def backend_port(client: httpx.AsyncClient, model: str) -> int:
    status = (await client.get("/admin/status")).json()
    port = status["models"][model]["port"]
    assert port, f"model {model} is not running: {status}"
    return int(port)


async def backend_stats(port: int) -> dict[str, int]:
    async with httpx.AsyncClient(trust_env=False) as direct:
        response = await direct.get(f"http://127.0.0.1:{port}/stats")
        return dict(response.json())


async def wait_for_stats(port: int, key: str, at_least: int, within: float = 5.0) -> dict[str, int]:
    """Poll the backend's /stats until ``key >= at_least`` (bounded); returns the stats."""
    with trio.fail_after(within):
        while True:
            stats = await backend_stats(port)
            if stats[key] >= at_least:
                return stats
            await trio.sleep(0.01)


async def wait_for_status(
    client: httpx.AsyncClient, model: str, key: str, value: Any, within: float = 5.0
) -> dict[str, Any]:
    with trio.fail_after(within):
        while True:
            info: dict[str, Any] = (await client.get("/admin/status")).json()["models"][model]
            if info[key] == value:
                return info
            await trio.sleep(0.01)


async def read_sse(response: httpx.Response) -> list[str]:
    """All non-empty lines of an SSE response (comments included)."""
    lines = []
    async with aclosing(response.aiter_lines()) as stream:  # type: ignore[type-var]
        async for line in stream:
            if line:
                lines.append(line)
    return lines


_MODEL_SERVER = """
import http.server, json, socket, sys

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # /health, for the supervisor
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
%s
    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def model_server_cmd(do_post: str) -> list[str]:
    """A model ``cmd``: a tiny HTTP server whose POST handler is ``do_post`` (Python source,
    run with ``self`` and the request ``body`` in scope; ``json`` and ``socket`` imported)."""
    script = _MODEL_SERVER % textwrap.indent(textwrap.dedent(do_post), " " * 8)
    return ["{python}", "-c", script.replace("{", "{{").replace("}", "}}"), "{port}"]
