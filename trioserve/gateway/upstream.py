"""Upstream connections for the relay: a keep-alive pool whose every operation is O(1).

httpcore's own pool walks all its connections on every request and on every response close,
and probes each idle one with a ``poll()``: with 1,000 streams open that walk was 60% of the
daemon's CPU (py-spy, ``bench/load.py --only b --profile DIR``). The relay needs nothing that
walk buys — no HTTP/2, no proxies, no queueing inside the pool, since admission already bounds
the requests per model — so a request takes the most recently used idle connection to its
backend, or opens a new one, and gives it back when its response is closed. The connections
themselves are httpcore's, and httpx does everything around them.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any

import httpcore
import httpx
import trio

__all__ = ["KeepAlivePool", "LeanStream", "upstream_client"]

_Key = tuple[bytes, bytes, int]


class LeanStream(httpcore.AsyncNetworkStream):
    """A trio stream for httpcore that reads with fewer syscalls and scheduler trips.

    httpcore's own ``TrioStream`` enters a cancel scope and two context managers per read and
    write; the relay's deadlines are its own cancel scopes, so httpcore is never given a
    timeout. And trio's ``receive_some`` first tries ``recv`` (which fails while the backend is
    still generating), then waits, then receives and checkpoints once more. After a read that
    drained the socket, this waits first and receives once, and the wait is the checkpoint:
    per relayed chunk one syscall and one trip through the scheduler fewer.

    ``before_read``, when set, is awaited before each read: the relay sends the client what
    the previous read brought (h11 reads only once every event of the last read was taken).
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        # Nothing is there yet when a response is first read: the request was just sent.
        self._drained = True
        self.before_read: Callable[[], Awaitable[None]] | None = None

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109 (httpcore interface)
        assert timeout is None, "the relay's cancel scopes are the deadlines"
        if self.before_read is not None:
            await self.before_read()
        sock = self._stream.socket
        waited = False
        try:
            while True:
                if self._drained:
                    await trio.lowlevel.wait_readable(sock)
                    waited = True
                try:
                    # fileno() each time: -1 (EBADF) once closed, never another connection's.
                    data = os.read(sock.fileno(), max_bytes)
                    break
                except BlockingIOError:
                    self._drained = True
        except (OSError, trio.ClosedResourceError) as exc:
            raise httpcore.ReadError(exc) from exc
        if not waited:
            # Data was already there: still a checkpoint, as every trio read is.
            await trio.lowlevel.checkpoint()
        self._drained = len(data) < max_bytes
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109 (httpcore interface)
        assert timeout is None, "the relay's cancel scopes are the deadlines"
        if not buffer:
            return
        # A request (head and body) nearly always fits the socket at once: one write, and no
        # checkpoint, since the read of the answer that follows is one. What did not fit goes
        # trio's way.
        sent = 0
        try:
            sent = os.write(self._stream.socket.fileno(), buffer)
        except BlockingIOError:
            pass
        except OSError as exc:
            raise httpcore.WriteError(exc) from exc
        if sent == len(buffer):
            return
        try:
            await self._stream.send_all(buffer[sent:])
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise httpcore.WriteError(exc) from exc

    async def aclose(self) -> None:
        await self._stream.aclose()

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            return self._stream.socket.is_readable()
        if info == "socket":
            return self._stream.socket
        return None


class _LeanBackend(httpcore.TrioBackend):
    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore interface)
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            stream = await trio.open_tcp_stream(host, port, local_address=local_address)
        except OSError as exc:
            raise httpcore.ConnectError(exc) from exc
        return LeanStream(stream)


class KeepAlivePool:
    """Idle connections per backend, most recently used first. Active connections belong to
    their responses, which close them or give them back."""

    def __init__(self, max_idle_per_backend: int, keepalive_expiry: float) -> None:
        self._max_idle = max_idle_per_backend
        self._expiry = keepalive_expiry
        self._idle: dict[_Key, list[httpcore.AsyncHTTPConnection]] = {}
        self._closed = False
        self._backend = _LeanBackend()

    @property
    def idle_count(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        origin = request.url.origin
        key = (origin.scheme, origin.host, origin.port)
        connection = await self._take_idle(key)
        if connection is None:
            connection = httpcore.AsyncHTTPConnection(
                origin=origin, keepalive_expiry=self._expiry, network_backend=self._backend
            )
        try:
            response = await connection.handle_async_request(request)
        except BaseException:
            with trio.CancelScope(shield=True):
                await connection.aclose()
            raise
        assert hasattr(response.stream, "aclose")
        network = response.extensions.get("network_stream")
        return httpcore.Response(
            status=response.status,
            headers=response.headers,
            content=_GivenBack(
                response.stream,
                connection,
                key,
                self,
                network if isinstance(network, LeanStream) else None,
            ),
            extensions=response.extensions,
        )

    async def _take_idle(self, key: _Key) -> httpcore.AsyncHTTPConnection | None:
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            # One poll() of this one socket: a backend that closed it (llama-server does after
            # every stream) or an expired keep-alive is dropped here.
            if connection.is_idle() and not connection.has_expired():
                return connection
            with trio.CancelScope(shield=True):
                await connection.aclose()
        return None

    async def give_back(self, key: _Key, connection: httpcore.AsyncHTTPConnection) -> None:
        # A response not read to its end has closed its connection already: that close is
        # what tells the backend to stop generating.
        if connection.is_idle() and not self._closed:
            idle = self._idle.setdefault(key, [])
            if len(idle) < self._max_idle:
                idle.append(connection)
                return
        await connection.aclose()

    async def sweep(self) -> None:
        """Close idle connections whose backend went away (e.g. a model that stopped), so
        none of them waits in CLOSE_WAIT until it would have been reused."""
        # Chosen without awaiting, so a connection given back meanwhile is never lost.
        dead: list[httpcore.AsyncHTTPConnection] = []
        for key, idle in list(self._idle.items()):
            alive: list[httpcore.AsyncHTTPConnection] = []
            for connection in idle:
                usable = connection.is_idle() and not connection.has_expired()
                (alive if usable else dead).append(connection)
            if alive:
                self._idle[key] = alive
            else:
                del self._idle[key]
        with trio.CancelScope(shield=True):
            for connection in dead:
                await connection.aclose()

    async def __aenter__(self) -> KeepAlivePool:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        # Often reached while the daemon is being cancelled: every connection must still be
        # closed (each close ends in a checkpoint that would raise Cancelled).
        self._closed = True
        idle, self._idle = self._idle, {}
        with trio.CancelScope(shield=True):
            for connections in idle.values():
                for connection in connections:
                    await connection.aclose()


class _GivenBack:
    """A response body that returns its connection to the pool when closed."""

    def __init__(
        self,
        stream: Any,
        connection: httpcore.AsyncHTTPConnection,
        key: _Key,
        pool: KeepAlivePool,
        network: LeanStream | None,
    ) -> None:
        self._stream = stream
        self._connection = connection
        self._key = key
        self._pool: KeepAlivePool | None = pool
        self._network = network

    def __aiter__(self) -> AsyncIterator[bytes]:
        # The inner iterator itself: no generator layer of ours per chunk.
        return self._stream.__aiter__()  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if self._network is not None:
            # The next request on this connection must not send to this one's client.
            self._network.before_read = None
        try:
            await self._stream.aclose()
        finally:
            with trio.CancelScope(shield=True):
                await pool.give_back(self._key, self._connection)


class _Transport(httpx.AsyncHTTPTransport):
    """httpx's transport (request and exception mapping) over ``KeepAlivePool``."""

    def __init__(self, pool: KeepAlivePool) -> None:
        super().__init__()
        self._pool = pool  # type: ignore[assignment]


def upstream_client(pool: KeepAlivePool) -> httpx.AsyncClient:
    """The relay's one shared client. Generation can take minutes: the relay's own cancel
    scopes are the deadlines, so httpx's are off."""
    return httpx.AsyncClient(
        transport=_Transport(pool),
        trust_env=False,
        timeout=httpx.Timeout(None),
        # One client serves every user: a cookie one backend answer sets must never be sent
        # with another user's request.
        cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
    )
