"""Everything trioserve knows about Hypercorn's insides, in this one module.

Written against Hypercorn 0.18 and pinned to it (``hypercorn>=0.18,<0.19`` in pyproject.toml):

* ``hypercorn_config``: our settings, through Hypercorn's public ``Config``.
* ``serve``: a fork of ``hypercorn.trio.serve`` and ``hypercorn.trio.run.worker_serve``, which
  serves on our listeners (``listener.py``: ``/health`` at accept time, a take-over thread),
  with TLS as upstream does it, and on our own sockets (``sockets.py``: the admin socket, the
  health port). ``listening.py`` opens them all, with no Hypercorn names: the main port's
  sockets and TLS context are made here, with Hypercorn's ``Config``, and handed to it.
* ``LeanTCPServer``: Hypercorn's per-connection ``hypercorn.trio.tcp_server.TCPServer`` with
  its ``protocol_send`` overridden, ``run`` extended and its keep-alive timer (``idle_task``, a
  ``TrioSingleTask``) replaced by ``_IdleTimer``.
* ``Drain``: the drain before Hypercorn's own shutdown (ASGI only, no Hypercorn names).

``UPSTREAM_FINGERPRINTS`` records the upstream code the fork and the override were written
against; tests/test_hypercorn_coupling.py fails, naming what changed, when that code or any
other Hypercorn name used here changes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import ssl
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, Event, RawData
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.statsd import StatsdLogger
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import TrioSingleTask, WorkerContext
from hypercorn.typing import ConnectionState, LifespanState
from hypercorn.utils import ShutdownError, raise_shutdown, repr_socket_addr, wrap_app

from trioserve.config import Config
from trioserve.gateway.admin_access import ADMIN_PEER_KEY
from trioserve.gateway.relay import IN_PROCESS_USER_KEY
from trioserve.server.listener import HEALTH_STATE_KEY, Liveness, answer_on_health_port
from trioserve.server.listening import Listening, open_listening
from trioserve.server.sockets import ListenError, peer_of

__all__ = [
    "UPSTREAM_FINGERPRINTS",
    "Drain",
    "LeanTCPServer",
    "ListenError",
    "hypercorn_config",
    "retune",
    "serve",
]

# sha256 of ``ast.dump(ast.parse(inspect.getsource(obj)))`` (code, not formatting or comments)
# of the Hypercorn 0.18.0 code that ``serve`` forks and ``LeanTCPServer`` overrides. When
# Hypercorn changes one, re-read it, bring ``serve``/``LeanTCPServer`` in line, then update it.
UPSTREAM_FINGERPRINTS = {
    "hypercorn.trio.serve": "87123f311753e1f204ef7b5d4bd5ccb8268dbd15b1ac29998936a49618d22a88",
    "hypercorn.trio.run.worker_serve": (
        "e7b594d7f26f7269176275af689b892569eb1408f110df8bd25d2014cb65e688"
    ),
    "hypercorn.trio.tcp_server.TCPServer": (
        "ec7cfe8efb2abe78ba7d062f827ff9a9cf8d9d95a0c99e36bc80ae12c55e5f52"
    ),
}

# Hypercorn's read_timeout applies to every read of a connection, also while a long response
# streams and the client rightly sends nothing, so it must outlast any request. Slow request
# bodies are bounded by the relay's own body deadline instead.
READ_TIMEOUT_MARGIN = 30
# The kernel's accept queue: 1,000 clients connecting at once must not see SYN drops (each
# costs a second of retransmit). Capped by net.core.somaxconn.
BACKLOG = 4096
KEEP_ALIVE_TIMEOUT = 5
# Request line plus headers; larger gets 431 from h11 / 400, never our memory.
MAX_HEADER_BYTES = 32 * 1024
# A client that takes no byte of a response for this long is cut off.
SEND_LIMIT = 30.0
# A TLS handshake is a few round trips: a client that has not finished one in this long is gone
# or stalling on purpose, and holds a task and a descriptor until then (Hypercorn's: 60 s).
TLS_HANDSHAKE_TIMEOUT = 10
# The drain (see ``Drain``) ends once no request has been in flight for this long, by default
# (``server.drain_quiet``, read at the stop): long enough to span the gap between one request
# of a busy client and its next, short enough that a daemon stopped just after a request is
# not held up noticeably. Behind a balancer without retries it must outlast the balancer's
# detection of the 503: behind HAProxy without retries, checks every 2 s and 2 to fail, a
# rolling restart failed 62-75 of ~580 requests with 0.1 s and none of 743 with 4.5 s.
DRAIN_QUIET = 0.1
# The drain takes at most this share of ``graceful_timeout`` (counted from the stop request):
# a request accepted at its very end still has the rest to finish.
DRAIN_SHARE = 0.5
# The requests that keep the drain going: the relay's. An operator's long-lived admin stream
# (``/admin/events``, a status page) is no sign that a balancer still sends work.
DRAIN_PATH_PREFIX = "/v1/"
# MCP's tool calls are POSTs to /mcp: drained as the relay's requests are. Its streams that
# never end by themselves are not counted (``on_drained`` ends them): GET streams, and
# 2026-07-28's ``subscriptions/listen``, a POST named by its ``Mcp-Method`` header.
DRAIN_MCP_PATH = "/mcp"
_MCP_LISTEN = (b"mcp-method", b"subscriptions/listen")

log = logging.getLogger(__name__)


def hypercorn_config(config: Config) -> HypercornConfig:
    hyper = HypercornConfig()
    host = config.server.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    hyper.bind = [f"{host}:{config.server.port}"]
    hyper.accesslog = None
    hyper.errorlog = logging.getLogger("hypercorn.error")
    retune(hyper, config)
    hyper.backlog = BACKLOG
    hyper.h11_max_incomplete_size = MAX_HEADER_BYTES
    # An idle keep-alive connection is closed after this long. Short, because a client that
    # vanished after a streamed response leaves its socket in CLOSE_WAIT until then.
    hyper.keep_alive_timeout = KEEP_ALIVE_TIMEOUT
    server = config.server
    if config.tls:
        # Hypercorn's own TLS: its context offers h2 and http/1.1 by ALPN (``alpn_protocols``).
        hyper.certfile = str(Path(server.tls_cert).expanduser())
        hyper.keyfile = str(Path(server.tls_key).expanduser())
        hyper.ssl_handshake_timeout = TLS_HANDSHAKE_TIMEOUT
        if server.tls_client_ca:
            hyper.ca_certs = str(Path(server.tls_client_ca).expanduser())
            hyper.verify_mode = ssl.CERT_REQUIRED
    # Our own deadlines cover requests; Hypercorn's would cut long streams.
    return hyper


def retune(hyper: HypercornConfig, config: Config) -> None:
    """The settings a reload changes in the running server. Hypercorn reads them from this
    object at each use (``read_timeout`` at every read of a connection, ``graceful_timeout`` at
    the stop): changed here, they are in force for every connection, open ones included."""
    hyper.graceful_timeout = config.server.shutdown_grace
    hyper.read_timeout = int(config.server.request_timeout) + READ_TIMEOUT_MARGIN


class LeanTCPServer(TCPServer):
    """Hypercorn's connection, with a send that is cheap, whole and bounded.

    Cheap: Hypercorn's own send takes a lock, enters a cancel scope and goes through trio's
    socket layer, each with a checkpoint: ~15 % of the daemon's CPU with 1,000 streams open
    (py-spy). Here a send the socket takes whole is one ``write`` and one trip through the
    scheduler.

    Whole: Hypercorn has updated h11's state before it sends, so a send cancelled half-way
    would corrupt the response. A fast send cannot be interrupted; the rest of a partial one
    (or a send while another waits) goes out under Hypercorn's lock, shielded. So the relay
    may send from any task, under any cancel scope.

    Bounded: a client that takes no byte for ``SEND_LIMIT`` is cut off (the connection is
    closed; its request sees the client gone). Hypercorn's own shielded send would wait for it
    forever, and hold up the daemon's stop.

    Over TLS (and so HTTP/2) only the bound applies: the send is Hypercorn's (``_send_tls``).
    """

    def __init__(self, *args: Any) -> None:
        """Hypercorn's ``(app, config, context, state, stream)``."""
        super().__init__(*args)
        # TLS streams have no plain socket to write to (``_send_tls``). The name is ours:
        # Hypercorn's TCPServer has no attribute of that name (the coupling test checks).
        self._plain_socket = (
            self.stream.socket if isinstance(self.stream, trio.SocketStream) else None
        )
        self.idle_task = _IdleTimer()

    async def run(self) -> None:
        """Hypercorn's ``run``, then the connection's one reference cycle cut."""
        try:
            await super().run()
        finally:
            # Hypercorn's ``run`` sets ``self.protocol`` to a ``ProtocolWrapper`` whose ``send``
            # is our bound ``protocol_send``: server -> protocol -> bound method -> server, the
            # one cycle a finished connection keeps (tests/test_hypercorn_coupling.py). Cut,
            # the connection is freed at once by reference counting instead of waiting for the
            # garbage collector, whose passes hold the GIL (and so /health) with 1,000 streams
            # open. Nothing uses ``protocol`` once ``run`` has returned: every task that could
            # ran in ``run``'s own task group. It is missing when ``run`` ended before it made
            # the protocol (a client gone before ``getpeername``).
            with contextlib.suppress(AttributeError):
                del self.protocol

    async def protocol_send(self, event: Event) -> None:
        if type(event) is not RawData:
            await super().protocol_send(event)
            return
        if self._plain_socket is None:
            await self._send_tls(event.data)
            return
        data = event.data
        sent = 0
        if not self.send_lock.locked():
            try:
                # fileno() each time: it is -1 once the stream is closed, and a remembered
                # number could by then belong to another connection.
                sent = os.write(self._plain_socket.fileno(), data)
            except BlockingIOError:
                pass
            except OSError:
                # The client is gone (EPIPE, ECONNRESET) or the stream closed (EBADF): what
                # Hypercorn does on a broken or closed stream.
                await self.protocol.handle(Closed())
                return
            if sent == len(data):
                # Yield as Hypercorn's send did: the connection's reader may hold the rest of
                # the request (a body not yet parsed when the app answers early, e.g. 401);
                # if the response finished first, Hypercorn would close a keep-alive
                # connection the client is about to reuse.
                await trio.lowlevel.cancel_shielded_checkpoint()
                return
        await self._send_rest(data[sent:])

    async def _send_tls(self, data: bytes) -> None:
        """Hypercorn's send (whole, under its lock, shielded) with our bound: over TLS, a
        client that takes none of it for ``SEND_LIMIT`` is cut off. The bound is on the whole
        send here (trio's TLS stream says nothing of partial progress); Hypercorn sends a
        response in pieces as the app hands them over, so a reader that is merely slow is
        not cut off."""
        with trio.CancelScope(shield=True):
            async with self.send_lock:
                with trio.move_on_after(SEND_LIMIT) as waiting:
                    try:
                        await self.stream.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        await self.protocol.handle(Closed())
                        return
                if waiting.cancelled_caught:
                    log.info("closing a connection whose client took nothing for %gs", SEND_LIMIT)
                    # A TLS stream whose send was cancelled is broken: closed without goodbye.
                    await trio.aclose_forcefully(self.stream)
                    await self.protocol.handle(Closed())

    async def _send_rest(self, data: bytes) -> None:
        assert self._plain_socket is not None
        rest = memoryview(data)
        with trio.CancelScope(shield=True):
            async with self.send_lock:
                while rest:
                    # The limit is on the client's progress, not on the whole send: a slow
                    # reader of a large answer is fine, a client that takes nothing is not.
                    with trio.move_on_after(SEND_LIMIT) as waiting:
                        await trio.lowlevel.wait_writable(self._plain_socket)
                    if waiting.cancelled_caught:
                        log.info(
                            "closing a connection whose client took nothing for %gs", SEND_LIMIT
                        )
                        await self.stream.aclose()
                        await self.protocol.handle(Closed())
                        return
                    try:
                        sent = os.write(self._plain_socket.fileno(), rest)
                    except BlockingIOError:
                        continue
                    except (OSError, trio.ClosedResourceError):
                        await self.protocol.handle(Closed())
                        return
                    rest = rest[sent:]


class _IdleTimer(TrioSingleTask):
    """Hypercorn's ``TrioSingleTask`` for a connection's keep-alive timer, without its lock
    and ``nursery.start``.

    Hypercorn starts the timer when a connection opens and stops it when a request's head is
    parsed; with ``TCP_DEFER_ACCEPT`` the head is nearly always there at once, so both come
    before the request can be served. With ``TrioSingleTask`` that was a lock and a task start
    waited for, two passes of the scheduler (~0.17 ms of every new connection's time to first
    byte on these machines). Here neither awaits anything, so no lock is needed (one cannot
    interleave with another), and the timer's task is only spawned: stopped before it runs, it
    ends at its first checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self._scope: trio.CancelScope | None = None

    async def restart(self, task_group: Any, action: Callable[[], Awaitable[None]]) -> None:
        if self._scope is not None:
            self._scope.cancel()
        scope = self._scope = trio.CancelScope()
        task_group.spawn(_run_in, scope, action)

    async def stop(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None


async def _run_in(scope: trio.CancelScope, action: Callable[[], Awaitable[None]]) -> None:
    with scope:
        await action()


class Drain:
    """The ASGI app, counting the relay's requests in flight, and the drain built on that.

    When the daemon is asked to stop, closing the listener at once refuses the requests that a
    load balancer sends before it has noticed (a Kubernetes Service, a balancer without
    retries). So shutdown first *drains*: /health answers ``503 {"status":"draining"}``, which
    takes the node out of a health-checking balancer's rotation, while the listener stays open
    and every request is served as usual. The drain ends once no request has been in flight for
    ``quiet`` seconds (the balancer stopped sending), or after its share of the grace; a daemon
    idle that long when asked to stop skips it. Then Hypercorn's shutdown closes the listener.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.in_flight = 0
        # trio time when the last request in flight ended.
        self.idle_since = -math.inf
        self._idle: trio.Event | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not (
            scope["path"].startswith(DRAIN_PATH_PREFIX)
            or (
                scope["path"] == DRAIN_MCP_PATH
                and scope["method"] == "POST"
                and _MCP_LISTEN not in scope["headers"]
            )
        ):
            await self.app(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self.idle_since = trio.current_time()
                if self._idle is not None:
                    self._idle.set()

    async def until_quiet(self, quiet: float = DRAIN_QUIET) -> None:
        """Return once no request has been in flight for ``quiet`` seconds."""
        while True:
            if self.in_flight:
                self._idle = trio.Event()
                await self._idle.wait()
                continue
            # A deadline, not a poll: a request that begins and ends meanwhile moves it.
            quiet_at = self.idle_since + quiet
            if trio.current_time() >= quiet_at:
                return
            await trio.sleep_until(quiet_at)


def _tls_context(hyper: HypercornConfig) -> ssl.SSLContext | None:
    try:
        return hyper.create_ssl_context()
    except (OSError, ValueError) as exc:
        files = ", ".join(
            f"{name} {path}"
            for name, path in (
                ("tls_cert", hyper.certfile),
                ("tls_key", hyper.keyfile),
                ("tls_client_ca", hyper.ca_certs),
            )
            if path
        )
        raise ListenError(f"cannot use the TLS files ({files}): {exc}") from exc


def _listen(
    hyper: HypercornConfig,
    liveness: Liveness,
    admin_socket: Path | None,
    admin_group: str,
    health_port: int,
) -> tuple[Listening, list[str]]:
    """Every listening socket (``listening.py``: all or none), and the main port's URLs. The
    main port's sockets and TLS context are Hypercorn's, from ``hyper``."""
    tls = _tls_context(hyper)
    sockets = hyper.create_sockets()
    listening = open_listening(
        secure=sockets.secure_sockets,
        insecure=sockets.insecure_sockets,
        tls=tls,
        backlog=hyper.backlog,
        liveness=liveness,
        admin_socket=admin_socket,
        admin_group=admin_group,
        health_port=health_port,
    )
    try:
        binds = [
            f"{scheme}://{repr_socket_addr(sock.family, sock.getsockname())}"
            for scheme, group in (
                ("https", sockets.secure_sockets),
                ("http", sockets.insecure_sockets),
            )
            for sock in group
        ]
    except BaseException:
        listening.close()
        raise
    return listening, binds


async def serve(
    app: Any,
    hyper: HypercornConfig,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]],
    drain_quiet: Callable[[], float] = lambda: DRAIN_QUIET,
    admin_socket: Path | None = None,
    admin_group: str = "",
    health_port: int = 0,
    on_drained: Callable[[], None] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A fork of ``hypercorn.trio.serve`` and ``worker_serve`` (see ``UPSTREAM_FINGERPRINTS``).

    What differs from upstream: our listeners (``DirectListener`` and the take-over thread,
    ``listener.py``) instead of ``trio.SocketListener`` for plain HTTP, with ``defer_accept``;
    ``LeanTCPServer`` for each connection; no QUIC, ``insecure_bind`` or ``max_requests``;
    ``task_status.started`` once the take-over threads run; the ``Drain`` between
    ``shutdown_trigger`` and the shutdown, with ``graceful_timeout`` counted from
    ``shutdown_trigger`` (the drain is part of it). TLS is upstream's (``trio.SSLListener``
    around the listening socket; no accept-time ``/health`` there: ``listener.py`` says why).
    Ours besides: the admin socket at ``admin_socket`` (its connections marked admin, with
    their peer's credentials) and the health port (``sockets.py``), both opened with the main
    port's listeners (``listening.py``) and closed with them, the admin socket's file removed;
    ``on_drained``, called when the drain ends and before Hypercorn waits for the connections
    (the MCP endpoint ends its sessions there, whose GET streams would hold the stop).
    The rest is Hypercorn's own: lifespan, and on shutdown no new connections, then the rest
    of ``graceful_timeout`` for the ones in flight.

    A socket of ours that cannot be opened raises ``ListenError``; the main port's bind, the
    ``OSError`` of Hypercorn's ``create_sockets``.
    """
    hyper.set_statsd_logger_class(StatsdLogger)
    drain = Drain(app)
    wrapped = wrap_app(drain, hyper.wsgi_max_body_size, None)
    lifespan_state: LifespanState = {}
    lifespan = Lifespan(wrapped, hyper, lifespan_state)
    context = WorkerContext(None)
    liveness = Liveness()
    # Set when shutdown_trigger returns: the grace is counted from then.
    stop_requested_at: float | None = None

    async def drained() -> None:
        nonlocal stop_requested_at
        await shutdown_trigger()
        stop_requested_at = trio.current_time()
        liveness.draining = True
        with trio.move_on_after(hyper.graceful_timeout * DRAIN_SHARE) as limit:
            await drain.until_quiet(drain_quiet())
        log.info(
            "drained (%s); closing the listener",
            f"still {drain.in_flight} requests in flight"
            if limit.cancelled_caught
            else "no request in flight",
        )
        if on_drained is not None:
            on_drained()

    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        # As upstream, the lifespan's state as startup left it. The app's /health answers from
        # the same Liveness. Only the admin socket's connections carry a peer, and only
        # in-process callers a user: whatever the lifespan put in its state, these never do.
        state = ConnectionState({**lifespan_state, HEALTH_STATE_KEY: liveness})
        state.pop(ADMIN_PEER_KEY, None)
        state.pop(IN_PROCESS_USER_KEY, None)

        async def admin_connection(stream: trio.SocketStream) -> None:
            try:
                peer = peer_of(stream.socket)
            except OSError:
                return  # gone already
            log.debug("admin socket: connection from uid %d, pid %d", peer.uid, peer.pid)
            # A state of its own per connection: the peer is this connection's, nobody else's.
            own = ConnectionState({**state, ADMIN_PEER_KEY: peer})
            await LeanTCPServer(wrapped, hyper, context, own, stream).run()

        async with trio.open_nursery() as server_nursery:
            listening, binds = _listen(hyper, liveness, admin_socket, admin_group, health_port)
            try:
                async with trio.open_nursery(strict_exception_groups=True) as accepting:
                    for thread_listener in listening.taken_over:
                        await accepting.start(thread_listener.run)
                    if not listening.taken_over:
                        # No thread keeps the heartbeat (TLS without a health port): the app's
                        # /health would say "stalled".
                        accepting.start_soon(liveness.run)
                    task_status.started(binds)
                    accepting.start_soon(raise_shutdown, drained)
                    accepting.start_soon(raise_shutdown, context.terminate.wait)
                    accepting.start_soon(
                        partial(
                            trio.serve_listeners,
                            partial(LeanTCPServer, wrapped, hyper, context, state),
                            listening.main,
                            handler_nursery=server_nursery,
                        )
                    )
                    if listening.admin:
                        accepting.start_soon(
                            partial(
                                trio.serve_listeners,
                                admin_connection,
                                listening.admin,
                                handler_nursery=server_nursery,
                            )
                        )
                    if listening.health:
                        accepting.start_soon(
                            partial(
                                trio.serve_listeners,
                                partial(answer_on_health_port, liveness),
                                listening.health,
                                handler_nursery=server_nursery,
                            )
                        )
            except BaseExceptionGroup as error:
                _, other_errors = error.split((ShutdownError, KeyboardInterrupt))
                if other_errors is not None:
                    raise other_errors from None
            finally:
                # No new connection from now on; the admin socket's file goes with it.
                listening.close()
                await context.terminated.set()
                if stop_requested_at is None:
                    stop_requested_at = trio.current_time()
                server_nursery.cancel_scope.deadline = stop_requested_at + hyper.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
