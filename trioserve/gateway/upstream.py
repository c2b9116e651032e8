"""The relay's side towards the model servers: HTTP/1.1 over our own sockets, with h11.

h11 does no I/O; this module owns each connection the way h11's ``examples/trio-server.py``
does (read, ``receive_data``, ``next_event``, ``send``, write), which lets it do what a client
library would not let the relay do:

- A response body is read one socket read at a time, and each ``receive_some`` returns
  everything that read brought (all its chunks joined): the relay sends it to its client in
  one send, so one upstream read costs one client send, however many tokens it carried.
- Reads are lean: after a read that drained the socket, wait first and read once (trio's
  ``receive_some`` tries, waits, reads and checkpoints again): per relayed chunk one syscall
  and one trip through the scheduler fewer.
- The keep-alive pool is O(1): a request takes the most recently used idle connection to its
  backend, or opens one. (httpcore's pool walked every connection, with a ``poll()`` each, on
  every request and close: 60 % of the daemon's CPU with 1,000 streams open.) Admission
  already bounds the requests per model, so the pool never queues.

A response not read to its end closes its connection: that close is what tells the backend to
stop generating. The relay's cancel scopes are the deadlines; nothing here times out.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol

import h11
import trio

from trioserve.errors import UpstreamError

if TYPE_CHECKING:
    from trioserve.supervision.model import Endpoint

__all__ = ["JSON", "KeepAlivePool", "StreamedBody", "UpstreamConnection", "UpstreamResponse"]

# As much as one read takes: 64 KiB, as httpcore read.
READ_SIZE = 65536
# A request's only headers besides Host and Content-Length: its Content-Type. No
# Accept-Encoding: a compressed answer would be relayed without its Content-Encoding. Nothing
# else either: no cookies, nothing of one user's exchange reaches another's.
JSON = b"application/json"
# Copied from the upstream response; hop-by-hop and length headers are the gateway's to set.
_PASSED_HEADERS = frozenset({b"content-type", b"cache-control", b"x-request-id"})

_Key = tuple[str, int]
# Looked up once, not per event of the body loop.
_Data, _EndOfMessage, _NEED_DATA = h11.Data, h11.EndOfMessage, h11.NEED_DATA


class StreamedBody(Protocol):
    """A request body sent as it arrives (an upload), of a length known up front."""

    @property
    def length(self) -> int: ...

    def chunks(self) -> AsyncIterator[bytes]: ...


class _ClosedBeforeAnswer(Exception):
    """The backend closed the connection before any byte of a response: the request was not
    processed, so it may be sent again."""


class UpstreamConnection:
    """One HTTP/1.1 connection to a backend: a trio socket and h11's client-side state."""

    __slots__ = ("_drained", "h11", "idle_until", "key", "sock")

    def __init__(self, key: _Key, sock: trio.socket.SocketType) -> None:
        self.key = key
        self.sock = sock
        self.h11 = h11.Connection(h11.CLIENT)
        # Nothing is there to read before a request was sent.
        self._drained = True
        self.idle_until = 0.0

    @classmethod
    async def open(cls, endpoint: Endpoint) -> UpstreamConnection:
        try:
            sock = await _connect(endpoint.host, endpoint.port)
        except OSError as exc:
            raise UpstreamError(
                f"model {endpoint.model!r} refused the request: {_reason(exc)}"
            ) from exc
        return cls((endpoint.host, endpoint.port), sock)

    def alive(self, now: float) -> bool:
        """Idle, not expired, and not closed by the backend: one ``poll()`` of this socket (a
        readable idle socket is at its end, or holds bytes nobody asked for)."""
        return now < self.idle_until and not self.sock.is_readable()

    def close(self) -> None:
        # trio's close tells any task waiting on it; it needs no await.
        self.sock.close()

    async def write(self, data: bytes) -> None:
        # A request (head and body) nearly always fits the socket at once: one write, and no
        # checkpoint, since the read of the answer that follows is one.
        view = memoryview(data)
        while view:
            try:
                # fileno() each time: -1 (EBADF) once closed, never another connection's.
                sent = os.write(self.sock.fileno(), view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.sock)
                continue
            view = view[sent:]
        self._drained = True

    async def read(self) -> bytes:
        """What one read brings (``b""`` at the end); waits first if the last read drained
        the socket, and is a checkpoint either way."""
        sock = self.sock
        waited = False
        while True:
            if self._drained:
                await trio.lowlevel.wait_readable(sock)
                waited = True
            try:
                data = os.read(sock.fileno(), READ_SIZE)
                break
            except BlockingIOError:
                self._drained = True
        if not waited:
            # Data was already there: still a checkpoint, as every trio read is.
            await trio.lowlevel.checkpoint()
        self._drained = len(data) < READ_SIZE
        return data


class UpstreamResponse:
    """A backend's answer: status and passed headers at once, then the body, one socket read
    at a time. ``close()`` gives the connection back to the pool when the answer was read to
    its end, and closes it otherwise."""

    __slots__ = (
        "_answered",
        "_connection",
        "_ended",
        "_model",
        "_parsed",
        "_pool",
        "headers",
        "status",
    )

    def __init__(
        self,
        head: h11.Response,
        connection: UpstreamConnection,
        pool: KeepAlivePool,
        model: str,
    ) -> None:
        self.status = head.status_code
        self.headers = [
            (name, value)
            for name, value in head.headers.raw_items()
            if name.lower() in _PASSED_HEADERS
        ]
        self._connection: UpstreamConnection | None = connection
        self._pool = pool
        self._model = model
        self._answered = False
        self._ended = False
        # Everything h11 holds was parsed. Not yet: the head's read may have brought body bytes.
        self._parsed = False

    @property
    def is_event_stream(self) -> bool:
        return any(
            name.lower() == b"content-type" and value.startswith(b"text/event-stream")
            for name, value in self.headers
        )

    async def receive_some(self) -> bytes:
        """Everything of the body the next socket read brought (body bytes the head's read
        brought come first, without a read); ``b""`` once the body has ended."""
        if self._ended:
            return b""
        connection = self._connection
        assert connection is not None, "response already closed"
        state = connection.h11
        try:
            while True:
                if self._parsed:
                    # h11 holds nothing more: what comes next needs a read.
                    state.receive_data(await connection.read())
                data = self._take_events(state)
                self._parsed = True
                if data or self._ended:
                    self._answered = True
                    return data
        except (OSError, trio.ClosedResourceError, h11.RemoteProtocolError) as exc:
            raise UpstreamError(self._broken(exc)) from exc

    def __aiter__(self) -> UpstreamResponse:
        return self

    async def __anext__(self) -> bytes:
        data = await self.receive_some()
        if not data:
            raise StopAsyncIteration
        return data

    def _take_events(self, state: h11.Connection) -> bytes:
        """All body bytes h11 can parse from what it holds, joined."""
        parts: list[bytes] = []
        while True:
            event = state.next_event()
            if type(event) is _Data:
                parts.append(event.data)
            elif event is _NEED_DATA:
                return b"".join(parts)
            elif type(event) is _EndOfMessage:
                self._ended = True
                return b"".join(parts)
            else:
                raise h11.RemoteProtocolError(f"unexpected {event!r}")

    def _broken(self, exc: BaseException) -> str:
        if not self._answered:
            return f"model {self._model!r} closed the connection before answering: {_reason(exc)}"
        what = "stream" if self.is_event_stream else "connection"
        return f"model {self._model!r} closed the {what} mid-answer: {_reason(exc)}"

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        state = connection.h11
        if (
            state.our_state is h11.DONE
            and state.their_state is h11.DONE
            and not state.trailing_data[0]
        ):
            state.start_next_cycle()
            self._pool.give_back(connection)
        else:
            connection.close()


class KeepAlivePool:
    """Idle connections per backend, most recently used last. A connection in use belongs to
    its response, which gives it back or closes it."""

    def __init__(self, max_idle_per_backend: int, keepalive_expiry: float) -> None:
        self._max_idle = max_idle_per_backend
        self._expiry = keepalive_expiry
        self._idle: dict[_Key, list[UpstreamConnection]] = {}
        self._closed = False

    @property
    def idle_count(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    async def request(
        self,
        endpoint: Endpoint,
        path: str,
        body: bytes | StreamedBody,
        *,
        method: bytes = b"POST",
        content_type: bytes | None = JSON,
    ) -> UpstreamResponse:
        """Send ``body`` to ``path`` (with its query string, if any) on ``endpoint``; returns
        once the response head is in. The caller must ``close()`` the response."""
        if isinstance(body, bytes):
            connection = self._take_idle((endpoint.host, endpoint.port))
            if connection is not None:
                try:
                    return await self._exchange(
                        connection, endpoint, method, path, content_type, body
                    )
                except _ClosedBeforeAnswer:
                    # A connection the backend closed while it was idle (llama-server closes
                    # after every stream, yet advertises keep-alive): the request was not
                    # processed, so once more on a fresh connection is safe.
                    pass
        # A streamed body can be sent only once: always on a fresh connection.
        connection = await UpstreamConnection.open(endpoint)
        try:
            return await self._exchange(connection, endpoint, method, path, content_type, body)
        except _ClosedBeforeAnswer as exc:
            raise UpstreamError(f"model {endpoint.model!r} closed the connection: {exc}") from None

    async def _exchange(
        self,
        connection: UpstreamConnection,
        endpoint: Endpoint,
        method: bytes,
        path: str,
        content_type: bytes | None,
        body: bytes | StreamedBody,
    ) -> UpstreamResponse:
        state = connection.h11
        length = len(body) if isinstance(body, bytes) else body.length
        head = [
            (b"host", f"{endpoint.host}:{endpoint.port}".encode()),
            *([(b"content-type", content_type)] if content_type is not None else []),
            (b"content-length", str(length).encode()),
        ]
        try:
            request = state.send(h11.Request(method=method, target=path.encode(), headers=head))
            assert request is not None
            if isinstance(body, bytes):
                await _send_request(connection, _with_body(state, request, body))
            else:
                await _send_request(connection, request)
                await _send_streamed(connection, body)
            head_in = await _receive_head(connection)
        except BaseException as exc:
            connection.close()
            if isinstance(exc, OSError | trio.ClosedResourceError | h11.ProtocolError):
                raise UpstreamError(
                    f"model {endpoint.model!r} closed the connection: {_reason(exc)}"
                ) from exc
            raise
        return UpstreamResponse(head_in, connection, self, endpoint.model)

    def _take_idle(self, key: _Key) -> UpstreamConnection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        now = trio.current_time()
        while idle:
            connection = idle.pop()
            if connection.alive(now):
                return connection
            connection.close()
        return None

    def give_back(self, connection: UpstreamConnection) -> None:
        """Keep a connection whose exchange is complete (h11 in ``IDLE``) for the next request."""
        idle = None if self._closed else self._idle.setdefault(connection.key, [])
        # Readable at once: closed by the backend already (llama-server closes its connection
        # after every stream, while it announces keep-alive). Closed now, at the end of this
        # answer, rather than by the next request on its way to its first byte.
        if idle is None or len(idle) >= self._max_idle or connection.sock.is_readable():
            connection.close()
            return
        connection.idle_until = trio.current_time() + self._expiry
        idle.append(connection)

    async def sweep(self) -> None:
        """Close idle connections whose backend went away (e.g. a model that stopped), so
        none of them waits in CLOSE_WAIT until it would have been reused."""
        now = trio.current_time()
        for key, idle in list(self._idle.items()):
            alive: list[UpstreamConnection] = []
            for connection in idle:
                if connection.alive(now):
                    alive.append(connection)
                else:
                    connection.close()
            if alive:
                self._idle[key] = alive
            else:
                del self._idle[key]
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> KeepAlivePool:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every idle connection; later ones given back are closed too. Often reached
        while the daemon is being cancelled: the closes need no await, so all of them happen
        before the checkpoint that may raise ``Cancelled``."""
        self._closed = True
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.close()
        await trio.lowlevel.checkpoint()


def _with_body(state: h11.Connection, head: bytes, body: bytes) -> bytes:
    """The request's head and body, to go out in one write."""
    data = (state.send_with_data_passthrough(h11.Data(data=body)) or []) if body else []
    end = state.send(h11.EndOfMessage())
    assert not end  # Content-Length framing: nothing after the body
    return b"".join([head, *data])


async def _send_streamed(connection: UpstreamConnection, body: StreamedBody) -> None:
    """The body as the client sends it, each piece written as it arrives. A backend that
    stops reading (it answered early, or died) fails the write: an ``OSError``."""
    state = connection.h11
    async for chunk in body.chunks():
        data = state.send_with_data_passthrough(h11.Data(data=chunk))
        if data:
            await connection.write(b"".join(data))
    end = state.send(h11.EndOfMessage())
    assert not end


async def _send_request(connection: UpstreamConnection, data: bytes) -> None:
    try:
        await connection.write(data)
    except (OSError, trio.ClosedResourceError) as exc:
        # Nothing of an answer yet: for a pooled connection, the backend closed it idle.
        raise _ClosedBeforeAnswer(_reason(exc)) from exc


async def _receive_head(connection: UpstreamConnection) -> h11.Response:
    state = connection.h11
    received = False
    while True:
        event = state.next_event()
        if type(event) is h11.Response:
            return event
        if type(event) is h11.InformationalResponse:
            continue  # 100 Continue and friends: the answer follows
        if event is not h11.NEED_DATA:
            raise h11.RemoteProtocolError(f"unexpected {event!r} before the response head")
        try:
            data = await connection.read()
        except (OSError, trio.ClosedResourceError) as exc:
            if received:
                raise
            raise _ClosedBeforeAnswer(_reason(exc)) from exc
        if not data and not received:
            raise _ClosedBeforeAnswer("it closed the connection without sending a response")
        received = True
        state.receive_data(data)


async def _connect(host: str, port: int) -> trio.socket.SocketType:
    """A connected socket to the address ``host``, port ``port``, with ``TCP_NODELAY`` (as
    trio's ``SocketStream``).

    A model is a child on loopback (``supervision.run.CHILD_HOST``), where the kernel has done
    the whole handshake by the time a non-blocking ``connect`` returns ``EINPROGRESS``: the
    socket is used at once, with no wait for writability. ``trio.open_tcp_stream`` (lookup,
    happy eyeballs in a nursery, a wait for writability) took 0.4-0.7 ms here against
    0.1-0.2 ms, on every streamed request's way to its first token: llama-server closes its
    connection after each stream, so each one opens a new connection."""
    # ``host`` is an address, never a name to look up: a model's is ``CHILD_HOST``.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = sock.connect_ex((host, port))
        # EINTR: a signal came first; the connect goes on, as with EINPROGRESS (POSIX).
        if code in (errno.EINPROGRESS, errno.EINTR):
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if not code and not _connected(sock):
                # Not on loopback, or the backend's accept queue is full: wait, as trio does.
                await trio.lowlevel.wait_writable(sock)
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            raise OSError(code, os.strerror(code))
        return trio.socket.from_stdlib_socket(sock)
    except BaseException:
        sock.close()
        raise


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
