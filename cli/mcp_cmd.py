"""``trioserve mcp``: an MCP server on stdin/stdout that forwards to the running daemon's ``/mcp``.

For hosts that launch a command (Claude Desktop, Cursor, …). Two transports of the official SDK
are joined back to back: the host speaks to ``mcp.server.stdio.stdio_server``, the daemon is
reached through ``mcp.client.streamable_http.streamable_http_client``; messages are moved
between them unchanged, so every protocol version the daemon serves is served here. What the
bridge adds:

- **Nothing waits behind anything.** The HTTP transport POSTs each request in its own task, so a
  ``ping`` during a slow ``chat`` is answered at once (the old stdio server's fault was one loop
  doing one thing at a time).
- **Routing headers.** The daemon tells the protocol eras apart by the ``Mcp-Protocol-Version``
  header alone, which a stdio host does not send: a 2026-07-28 request gets it (with
  ``Mcp-Method`` and ``Mcp-Name``) from its own ``_meta`` envelope; in a handshake session every
  message after ``initialize`` gets the version the daemon answered, as the SDK's own client
  sends it. With those headers the transport also turns a host's ``notifications/cancelled`` for
  a 2026-07-28 request into closing that request's stream, which is that era's cancellation;
  in a handshake session the notification itself is forwarded. Either way the daemon cancels the
  call and its upstream request. Progress and every other notification pass through as they come.
  (``Mcp-Param-*`` headers, for tools whose schema marks arguments ``x-mcp-header``, are not
  added: trioserve's tools mark none.)
- **Where and who.** ``--url`` / ``TRIOSERVE_URL``, else the URL the running daemon of
  ``--config`` recorded, else its configured one (as other client commands find it), always over
  TCP: the admin socket is not used, as a session there would be an admin session. The only key
  sent is ``--api-key`` / ``TRIOSERVE_API_KEY``; the config's admin key and the local admin token
  are never sent (as with every client command, they go only to ``/admin``), so an agent gets
  the admin tools (``load_model``, ``unload_model``, model logs) only when it is launched with an
  admin key. ``https://`` takes ``--ca-cert``, ``--client-cert``, ``--client-key``.
- **Failures as one line.** Before reading stdin, one request checks that the daemon answers
  and takes the key (it asks for an unknown session, which opens nothing): no daemon, a refused
  key or ``/mcp`` turned off is one line on stderr and exit 1, where the host's log shows it. A
  daemon lost later ends the bridge the same way (its session died with it).
- **Ending.** EOF on stdin (the host is gone), SIGINT or SIGTERM: the session is ended with a
  ``DELETE /mcp`` (which cancels the calls still running there) and the command exits 0.

stdout carries nothing but MCP messages: while the bridge runs, file descriptor 1 points at
stderr (``stdio_server`` writes the wire through a private copy), and warnings (ours and the
SDK's) go to stderr through Python's default logging; no handler is installed.

The SDK is imported only when the command runs: it costs ~0.6 s, which no other command pays.
"""

from __future__ import annotations

import logging
import os
import signal
import ssl
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import trio
import typer

from .common import die
from .target import ClientOptions, Credential, client_command

if TYPE_CHECKING:
    import httpx2
    from mcp.client._transport import ReadStream, WriteStream
    from mcp.shared.message import SessionMessage
    from mcp_types import RequestId

    Source = ReadStream[SessionMessage | Exception]
    Sink = WriteStream[SessionMessage]

__all__ = ["McpBridgeError", "bridge", "mcp_endpoint", "register"]

MCP_PATH = "/mcp"
# Connecting to a local daemon takes microseconds; a few seconds covers a loaded machine.
CONNECT_TIMEOUT = 3.0
# Sending a request body and waiting for a pooled connection. Reads have no bound: a call's
# stream may stay quiet for as long as its model takes (the daemon bounds calls itself).
WRITE_TIMEOUT = 30.0
# How long the DELETE that ends the session may take when the bridge stops.
CLOSE_TIMEOUT = 2.0
# One read of stdin; a message longer than this is simply read in several.
_READ_SIZE = 1 << 16
# The session id of the start-up check: no session has it, so the daemon answers 404 from the SDK
# (a JSON-RPC error) after its own checks (key, Host, /mcp on), and opens nothing.
_PROBE_SESSION = "trioserve-mcp-probe"

log = logging.getLogger(__name__)


class McpBridgeError(Exception):
    """Why the bridge cannot run or stopped; ``str()`` is the one line to print."""


def mcp_endpoint(url: str) -> str:
    """The ``/mcp`` URL of the daemon at ``url`` (a URL already ending in ``/mcp`` is kept)."""
    url = url.rstrip("/")
    return url if url.endswith(MCP_PATH) else url + MCP_PATH


# -- stdin -----------------------------------------------------------------------------------------


class _StdinLines:
    """The lines of stdin, each read in a worker thread that a cancel abandons.

    ``stdio_server``'s own reader is a thread that a cancel must wait for, so Ctrl-C or a lost
    daemon would hang until the host wrote another line. ``os.read`` holds no lock of Python's,
    so an abandoned read (a daemon thread) is harmless at exit; and unlike a non-blocking
    ``trio.lowlevel.FdStream`` it leaves the mode of a terminal or pipe it shares alone.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = bytearray()
        self._scanned = 0  # no newline in the buffer before this offset
        self._eof = False

    def __aiter__(self) -> _StdinLines:
        return self

    async def __anext__(self) -> str:
        while True:
            end = self._buffer.find(b"\n", self._scanned)
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                self._scanned = 0
            elif self._eof:
                if not self._buffer:
                    raise StopAsyncIteration
                line = bytes(self._buffer)
                self._buffer.clear()
            else:
                self._scanned = len(self._buffer)
                await self._read()
                continue
            if line.strip():  # blank lines carry no message
                return line.decode("utf-8", errors="replace")

    async def _read(self) -> None:
        try:
            chunk = await trio.to_thread.run_sync(
                os.read, self._fd, _READ_SIZE, abandon_on_cancel=True
            )
        except OSError as exc:  # stdin closed or unreadable: as good as EOF
            log.warning("trioserve mcp: cannot read stdin (%s): stopping", exc)
            chunk = b""
        if chunk:
            self._buffer += chunk
        else:
            self._eof = True


# -- the routing headers ---------------------------------------------------------------------------


@dataclass
class _Router:
    """Adds the HTTP headers a message needs on its way up, learning the handshake version on
    the way down (see the module's docstring)."""

    # The version the daemon answered to ``initialize``; None before (or in a 2026 session).
    handshake_version: str | None = None
    _initialize_ids: set[RequestId] = field(default_factory=set)

    def up(self, item: SessionMessage) -> SessionMessage:
        """``item`` from the host, with the headers the daemon routes it by."""
        from mcp.shared.inbound import (
            MCP_METHOD_HEADER,
            MCP_NAME_HEADER,
            MCP_PROTOCOL_VERSION_HEADER,
            NAME_BEARING_METHODS,
            encode_header_value,
        )
        from mcp.shared.message import ClientMessageMetadata, SessionMessage
        from mcp_types import PROTOCOL_VERSION_META_KEY, JSONRPCRequest

        message = item.message
        if isinstance(message, JSONRPCRequest) and message.method == "initialize":
            # A new handshake: the version comes from its answer (the transport, too, sends
            # `initialize` without one).
            self.handshake_version = None
            self._initialize_ids.add(message.id)
            return item
        headers: dict[str, str] = {}
        if isinstance(message, JSONRPCRequest):
            params = message.params or {}
            meta = params.get("_meta")
            version = meta.get(PROTOCOL_VERSION_META_KEY) if isinstance(meta, dict) else None
            if isinstance(version, str):
                # A 2026-07-28 request: the headers copy its envelope, as the SDK's client's do.
                headers[MCP_PROTOCOL_VERSION_HEADER] = version
                headers[MCP_METHOD_HEADER] = message.method
                name_key = NAME_BEARING_METHODS.get(message.method)
                name = params.get(name_key) if name_key is not None else None
                if isinstance(name, str):
                    headers[MCP_NAME_HEADER] = encode_header_value(name)
        if not headers and self.handshake_version is not None:
            headers[MCP_PROTOCOL_VERSION_HEADER] = self.handshake_version
        if not headers:
            return item
        return SessionMessage(message, metadata=ClientMessageMetadata(headers=headers))

    def down(self, item: SessionMessage) -> None:
        """Learn the handshake version from the answer to ``initialize``."""
        from mcp_types import JSONRPCError, JSONRPCResponse

        message = item.message
        if not isinstance(message, JSONRPCResponse | JSONRPCError):
            return
        if message.id is None or message.id not in self._initialize_ids:
            return
        self._initialize_ids.discard(message.id)
        if isinstance(message, JSONRPCResponse):
            version = message.result.get("protocolVersion")
            if isinstance(version, str):
                self.handshake_version = version


# -- the bridge ------------------------------------------------------------------------------------


def _unreachable(exc: BaseException, url: str) -> str:
    """The one line for a request to ``url`` that got no answer."""
    import httpx2

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLCertVerificationError):
            why = current.verify_message or current.reason or str(current)
            return (
                f"cannot verify the certificate of {url} ({why}): pass --ca-cert "
                "(TRIOSERVE_CA_CERT) with the CA that signed it"
            )
        if isinstance(current, ssl.SSLError):
            return f"the TLS handshake with {url} failed ({current.reason or current})"
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    if isinstance(exc, httpx2.ConnectError | httpx2.ConnectTimeout):
        return f"no daemon answers at {url}"
    return f"talking to the daemon at {url} failed: {exc or type(exc).__name__}"


async def _check_daemon(http: httpx2.AsyncClient, endpoint: str) -> None:
    """Raise ``McpBridgeError`` unless the daemon answers ``endpoint`` and takes our key."""
    import httpx2

    try:
        response = await http.get(
            endpoint,
            headers={"accept": "text/event-stream", "mcp-session-id": _PROBE_SESSION},
        )
    except httpx2.HTTPError as exc:
        raise McpBridgeError(_unreachable(exc, endpoint)) from exc
    if response.status_code < 400:
        return
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("jsonrpc") == "2.0":
        return  # the MCP endpoint itself answered (the probe's session is unknown, as meant)
    error = body.get("error") if isinstance(body, dict) else None
    message = (error.get("message") or error.get("code")) if isinstance(error, dict) else None
    if isinstance(message, str) and message:
        raise McpBridgeError(f"the daemon at {endpoint} refused: {message}")
    raise McpBridgeError(
        f"GET {endpoint} answered {response.status_code} (is this a trioserve daemon?)"
    )


async def _pump_up(source: Source, sink: Sink, router: _Router, done: trio.CancelScope) -> None:
    """Host → daemon, until EOF on stdin; then everything stops."""
    async with sink:
        async for item in source:
            if isinstance(item, Exception):
                log.warning("trioserve mcp: ignored a line of stdin (no JSON-RPC): %s", item)
                continue
            await sink.send(router.up(item))
    done.cancel()  # EOF: the host is gone


async def _pump_down(source: Source, sink: Sink, router: _Router) -> None:
    """Daemon → host: answers, progress, notifications."""
    async with sink:
        async for item in source:
            if isinstance(item, Exception):
                log.warning("trioserve mcp: ignored a message from the daemon: %s", item)
                continue
            router.down(item)
            await sink.send(item)


async def _until_signal(done: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            done.cancel()
            return


async def bridge(
    endpoint: str, api_key: str | None, ssl_context: ssl.SSLContext | None, stdin_fd: int
) -> None:
    """Serve MCP on stdin (``stdin_fd``) and stdout, forwarding to ``endpoint``, until EOF,
    SIGINT or SIGTERM. Raises ``McpBridgeError`` when the daemon cannot be reached."""
    import anyio
    import httpx2
    from mcp.client.streamable_http import streamable_http_client
    from mcp.server.stdio import stdio_server

    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    http = httpx2.AsyncClient(
        headers=headers,
        timeout=httpx2.Timeout(WRITE_TIMEOUT, connect=CONNECT_TIMEOUT, read=None),
        # Without TLS no CA store is loaded (as in cli/client.py).
        verify=ssl_context or False,
        # A proxy from the environment has no business between us and a local daemon.
        trust_env=False,
    )
    router = _Router()
    lost: BaseException | None = None
    async with http:
        await _check_daemon(http, endpoint)
        try:
            with trio.CancelScope() as closing:
                stdin = cast("anyio.AsyncFile[str]", _StdinLines(stdin_fd))
                async with stdio_server(stdin=stdin) as (from_host, to_host):
                    async with streamable_http_client(endpoint, http_client=http) as (
                        from_daemon,
                        to_daemon,
                    ):
                        async with trio.open_nursery() as nursery:
                            done = nursery.cancel_scope
                            nursery.start_soon(_until_signal, done)
                            nursery.start_soon(_pump_up, from_host, to_daemon, router, done)
                            nursery.start_soon(_pump_down, from_daemon, to_host, router)
                        # Leaving the HTTP transport sends the DELETE that ends the session;
                        # it may not hold up the exit for long.
                        closing.deadline = trio.current_time() + CLOSE_TIMEOUT
                    # `stdio_server` waits for its stdin reader to see EOF, which after a
                    # signal may never come: it is cancelled (its thread abandoned) instead.
                    closing.cancel()
        except* httpx2.TransportError as group:
            # Raised from inside `except*` it would come out wrapped in a group of its own.
            lost = _first_leaf(group)
    if lost is not None:
        raise McpBridgeError(f"lost the daemon: {_unreachable(lost, endpoint)}") from lost


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


@client_command
def mcp(client: ClientOptions) -> None:
    """Serve MCP on stdin/stdout, forwarding to the running daemon's /mcp.

    For MCP hosts that launch a command. The daemon is reached over TCP at --url, else the URL
    of --config's daemon (never the admin socket), and only --api-key is sent: launched with an
    admin key, the session has the admin tools. Exits 0 on EOF, Ctrl-C or SIGTERM; 1 with one
    line on stderr when the daemon cannot be reached or refuses.
    """
    target = client.target()
    api_key = target.api_key if target.credential is Credential.API_KEY else None
    endpoint = mcp_endpoint(target.url)
    try:
        trio.run(bridge, endpoint, api_key, target.ssl_context, sys.stdin.fileno())
    except McpBridgeError as exc:
        die(str(exc))
    except KeyboardInterrupt:  # Ctrl-C before the bridge's own signal handling was in place
        pass


def register(app: typer.Typer) -> None:
    app.command("mcp")(mcp)
