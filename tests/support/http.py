"""HTTP in tests: request bodies, a raw HTTP/1.1 client, SSE lines, checks of answers."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import trio

# -- requests ------------------------------------------------------------------------------------


def chat(
    model: str = "echo", *, stream: bool = False, text: str = "a b c", **extra: Any
) -> dict[str, Any]:
    """A chat completion request for ``model``: one user message, ``text``."""
    return {
        "model": model,
        "stream": stream,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


def raw_post(
    body: dict[str, Any] | bytes = b"",
    *headers: bytes,
    path: str = "/v1/chat/completions",
    length: int | None = None,
) -> bytes:
    """A POST as bytes on the wire: ``body`` (a dict is sent as JSON) after a head with
    ``headers`` and a Content-Length of ``length`` (default: the body's own)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
        + b"".join(header + b"\r\n" for header in headers)
        + f"Content-Length: {len(data) if length is None else length}\r\n\r\n".encode()
        + data
    )


# -- a raw HTTP/1.1 client -----------------------------------------------------------------------


def raw_address(url: str) -> tuple[str, int]:
    """(host, port) of an ``http://host:port`` URL."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def head_complete(received: bytes | bytearray) -> bool:
    """True once ``received`` holds a whole response head."""
    return b"\r\n\r\n" in received


def response_complete(received: bytes | bytearray) -> bool:
    """True once ``received`` holds a whole HTTP/1.1 response with a Content-Length."""
    # Only the head is looked at: this runs after every read of a body that may be megabytes.
    end = received.find(b"\r\n\r\n")
    if end < 0:
        return False
    for line in bytes(received[:end]).split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(received) - (end + 4) >= int(value.strip())
    return False


def status_of(response: bytes) -> int:
    """The status code of a raw HTTP/1.1 response."""
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response.split(b" ", 2)[1])


class RawConnection:
    """One TCP connection to a server, spoken to byte for byte: for what an HTTP client would
    not send (or not let a test see), and for hanging up at a chosen moment."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._received = bytearray()  # not bytes: += on bytes copies all of it, every read
        self.closed = False  # the server closed (or reset) its end

    @property
    def received(self) -> bytes:
        """Everything the server sent so far."""
        return bytes(self._received)

    @classmethod
    async def open(cls, url: str, *, receive_buffer: int | None = None) -> RawConnection:
        """Connect to ``url``'s host and port; ``receive_buffer`` shrinks SO_RCVBUF, so that a
        client that does not read holds the server up after a few KB."""
        sock = trio.socket.socket()
        if receive_buffer is not None:
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, receive_buffer)
        await sock.connect(raw_address(url))
        return cls(trio.SocketStream(sock))

    async def __aenter__(self) -> RawConnection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def send(self, data: bytes) -> bool:
        """Send ``data``; False when the server had closed the connection (it may answer and
        close before taking all of a request: then what it said is still to be read)."""
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    async def read(
        self, until: Callable[[bytearray], bool] = lambda _: False, *, within: float = 10.0
    ) -> bytes:
        """Receive until ``until(everything received)`` holds or the server closes; without
        ``until``, to the close. Fails after ``within`` seconds. Returns all received so far."""
        with trio.move_on_after(within):
            while not until(self._received) and not self.closed:
                try:
                    data = await self.stream.receive_some(1 << 20)
                except trio.BrokenResourceError:  # a reset
                    data = b""
                if not data:
                    self.closed = True
                self._received += data
            return self.received
        raise AssertionError(
            f"within {within}s: neither the awaited answer nor a close (the connection is "
            f"still open); received {len(self._received)} bytes: {self.received[:300]!r}"
        )

    def server_unsent(self) -> int:
        """Bytes the server's end of this connection holds and could not hand over: with this
        client's receive window full, what its sends wait on. From ``/proc/net/tcp`` (both
        ends are on this host); on loopback a byte the window lets through is acknowledged at
        once, so only a closed window leaves any."""
        ours = _proc_net_address(self.stream.socket.getsockname())
        theirs = _proc_net_address(self.stream.socket.getpeername())
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1] == theirs and fields[2] == ours:
                return int(fields[4].partition(":")[0], 16)  # tx_queue:rx_queue
        return 0

    async def wait_server_unsent(self, at_least: int, *, within: float = 10.0) -> None:
        """Until the server's end holds ``at_least`` bytes this client has not taken (see
        ``server_unsent``): its sends wait for this client. (Polled: the kernel announces
        nothing.)"""
        with trio.fail_after(within):
            while self.server_unsent() < at_least:
                await trio.sleep(0.005)

    async def aclose(self) -> None:
        """Hang up."""
        await self.stream.aclose()


def _proc_net_address(address: tuple[str, int]) -> str:
    """An IPv4 ``(host, port)`` as ``/proc/net/tcp`` spells it: ``0100007F:1F90``."""
    host, port = address[:2]
    return f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}"


async def raw_exchange(url: str, request: bytes, *, within: float = 10.0) -> bytes:
    """Send ``request`` on a fresh connection; return the response, read to its
    Content-Length or until the server closes."""
    async with await RawConnection.open(url) as connection:
        await connection.send(request)
        return await connection.read(response_complete, within=within)


def blocking_exchange(url: str, request: bytes, *, send_after: float = 0.0) -> bytes:
    """Send ``request`` on a fresh connection from a plain blocking socket, ``send_after``
    seconds after connecting; return all the server sent until it closed. For a thread: it
    works while the trio loop is blocked, and makes no trio objects (nor garbage of theirs)."""
    with socket.create_connection(raw_address(url), timeout=10) as conn:
        time.sleep(send_after)
        conn.sendall(request)
        answer = bytearray()
        while chunk := conn.recv(65536):
            answer += chunk
    return bytes(answer)


async def impostor(stream: trio.SocketStream) -> None:
    """Another program's HTTP server, for ``trio.serve_tcp``: 200 to anything."""
    async with stream:
        with trio.move_on_after(5):
            request = b""
            while b"\r\n\r\n" not in request:
                data = await stream.receive_some(65536)
                if not data:
                    return
                request += data
            body = b'{"impostor": true}'
            with suppress(trio.BrokenResourceError):
                await stream.send_all(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )


# -- answers -------------------------------------------------------------------------------------


@asynccontextmanager
async def streaming(client: httpx.AsyncClient, body: dict[str, Any]) -> AsyncIterator[None]:
    """A streamed ``/v1/chat/completions`` with ``body`` in flight for the block: entered once
    its answer has begun (its model holds a request), hung up on exit."""
    async with trio.open_nursery() as nursery:
        begun = trio.Event()

        async def stream() -> None:
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                begun.set()
                await response.aread()

        nursery.start_soon(stream)
        await begun.wait()
        yield
        nursery.cancel_scope.cancel()


async def sse_lines(response: httpx.Response) -> AsyncGenerator[str, None]:
    """The non-empty lines of an event stream as they arrive: ``data: ...`` and comments.
    A loop that may leave early runs under ``async with aclosing(sse_lines(...))``."""
    async with aclosing(response.aiter_lines()) as lines:  # type: ignore[type-var]
        async for line in lines:
            if line:
                yield line


async def read_sse(response: httpx.Response) -> list[str]:
    """All non-empty lines of an event stream (comments included), to its end."""
    return [line async for line in sse_lines(response)]


def assert_openai_error(
    response: httpx.Response, status: int, code: str | None = None
) -> dict[str, Any]:
    """``response`` is ``status`` with the OpenAI error body ``{"error": {...}}`` (of ``code``,
    when given); returns the error."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code"}, error
    assert code is None or error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert isinstance(error["code"], str) and error["code"]
    return dict(error)


# Statuses a relayed request may end with when its model is being unloaded, evicted, expired,
# killed or is failing: anything but a 500 (a bug) or no answer at all (a hang).
CLEAN_ERROR_CODES = {
    400: "invalid_request",
    401: "invalid_api_key",
    404: "model_not_found",
    408: "invalid_request",
    413: "request_too_large",
    429: "queue_full",
    502: "upstream_error",
    503: "model_unavailable",
    504: "timeout",
}


def assert_clean_answer(status: int, body: bytes) -> None:
    """A non-streamed answer that is a success, or an error from the contract's table in the
    OpenAI shape; never a 500."""
    assert status != 500, body[:500]
    if status == 200:
        return
    assert status in CLEAN_ERROR_CODES, (status, body[:500])
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "code"}, error
    assert error["code"] == CLEAN_ERROR_CODES[status], (status, error)
