"""Everything trioserve knows about Hypercorn's insides, in this one module.

Written against Hypercorn 0.18 and pinned to it (``hypercorn>=0.18,<0.19`` in pyproject.toml):

* ``hypercorn_config``: our settings, through Hypercorn's public ``Config``.
* ``serve``: a fork of ``hypercorn.trio.serve`` and ``hypercorn.trio.run.worker_serve``, which
  serves on our listeners (``listener.py``: ``/health`` at accept time, a take-over thread).
* ``LeanTCPServer``: Hypercorn's per-connection ``hypercorn.trio.tcp_server.TCPServer`` with
  its ``protocol_send`` overridden and ``run`` extended.

``UPSTREAM_FINGERPRINTS`` records the upstream code the fork and the override were written
against; tests/test_hypercorn_coupling.py fails, naming what changed, when that code or any
other Hypercorn name used here changes.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, Event, RawData
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.statsd import StatsdLogger
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState, LifespanState
from hypercorn.utils import ShutdownError, raise_shutdown, repr_socket_addr, wrap_app

from trioserve.config import Config
from trioserve.server.listener import DirectListener, TakenOverConnections, defer_accept

__all__ = ["UPSTREAM_FINGERPRINTS", "LeanTCPServer", "hypercorn_config", "serve"]

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

log = logging.getLogger(__name__)


def hypercorn_config(config: Config) -> HypercornConfig:
    hyper = HypercornConfig()
    host = config.server.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    hyper.bind = [f"{host}:{config.server.port}"]
    hyper.accesslog = None
    hyper.errorlog = logging.getLogger("hypercorn.error")
    hyper.graceful_timeout = config.server.shutdown_grace
    hyper.read_timeout = int(config.server.request_timeout) + READ_TIMEOUT_MARGIN
    hyper.backlog = BACKLOG
    hyper.h11_max_incomplete_size = MAX_HEADER_BYTES
    # An idle keep-alive connection is closed after this long. Short, because a client that
    # vanished after a streamed response leaves its socket in CLOSE_WAIT until then.
    hyper.keep_alive_timeout = KEEP_ALIVE_TIMEOUT
    # Our own deadlines cover requests; Hypercorn's would cut long streams.
    return hyper


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
    forever.
    """

    def __init__(self, *args: Any) -> None:
        """Hypercorn's ``(app, config, context, state, stream)``."""
        super().__init__(*args)
        # TLS streams (not used by the gateway) have no plain socket to write to. The name is
        # ours: Hypercorn's TCPServer has no attribute of that name (the coupling test checks).
        self._plain_socket = (
            self.stream.socket if isinstance(self.stream, trio.SocketStream) else None
        )

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
        if type(event) is not RawData or self._plain_socket is None:
            await super().protocol_send(event)
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


async def serve(
    app: Any,
    hyper: HypercornConfig,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]],
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A fork of ``hypercorn.trio.serve`` and ``worker_serve`` (see ``UPSTREAM_FINGERPRINTS``).

    What differs from upstream: our listeners (``DirectListener`` and the take-over thread,
    ``listener.py``) instead of ``trio.SocketListener``, with ``defer_accept``; ``LeanTCPServer``
    for each connection; no TLS, QUIC or ``max_requests``; ``task_status.started`` once the
    take-over threads run. The rest is Hypercorn's own: lifespan, and on shutdown no new
    connections, then ``graceful_timeout`` for the ones in flight.
    """
    hyper.set_statsd_logger_class(StatsdLogger)
    wrapped = wrap_app(app, hyper.wsgi_max_body_size, None)
    lifespan_state: LifespanState = {}
    lifespan = Lifespan(wrapped, hyper, lifespan_state)
    context = WorkerContext(None)
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as server_nursery:
            sockets = hyper.create_sockets()
            listeners: list[trio.abc.Listener[trio.SocketStream]] = []
            taken_over: list[TakenOverConnections] = []
            binds = []
            for sock in sockets.insecure_sockets:
                sock.listen(hyper.backlog)
                sock.setblocking(False)
                defer_accept(sock)
                thread = TakenOverConnections(sock)
                taken_over.append(thread)
                # The loop accepts for itself while it can; the thread takes what it leaves.
                listeners += [DirectListener(sock, thread), thread]
                binds.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
            try:
                async with trio.open_nursery(strict_exception_groups=True) as accepting:
                    for thread_listener in taken_over:
                        await accepting.start(thread_listener.run)
                    task_status.started(binds)
                    accepting.start_soon(raise_shutdown, shutdown_trigger)
                    accepting.start_soon(raise_shutdown, context.terminate.wait)
                    accepting.start_soon(
                        partial(
                            trio.serve_listeners,
                            partial(
                                LeanTCPServer,
                                wrapped,
                                hyper,
                                context,
                                ConnectionState(lifespan_state.copy()),
                            ),
                            listeners,
                            handler_nursery=server_nursery,
                        )
                    )
            except BaseExceptionGroup as error:
                _, other_errors = error.split((ShutdownError, KeyboardInterrupt))
                if other_errors is not None:
                    raise other_errors from None
            finally:
                await context.terminated.set()
                server_nursery.cancel_scope.deadline = trio.current_time() + hyper.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
