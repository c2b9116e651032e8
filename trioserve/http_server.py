"""Hypercorn for the gateway: limits that keep slow or hostile clients cheap, and ``serve``."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.statsd import StatsdLogger
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState, LifespanState
from hypercorn.utils import ShutdownError, raise_shutdown, repr_socket_addr, wrap_app

from .config import Config
from .listener import DirectListener, TakenOverConnections, defer_accept

__all__ = ["hypercorn_config", "serve"]

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


async def serve(
    app: Any,
    hyper: HypercornConfig,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]],
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Hypercorn's ``worker_serve`` for trio, plus a thread that takes the connections the
    loop is too busy to accept, and answers ``/health`` on them (see ``listener.py``).

    The rest is Hypercorn's own: lifespan, ``TCPServer`` per connection, and on shutdown no new
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
                                TCPServer,
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
