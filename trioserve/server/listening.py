"""What ``hypercorn_serve.serve`` listens on, opened all at once or not at all: the main port
(plain HTTP with ``/health`` at accept time, or TLS), the admin socket and the health port, each
as the trio listeners its connections need, and all closed together at the end.

No Hypercorn names here: ``hypercorn_serve`` makes the main port's sockets and TLS context with
Hypercorn's ``Config`` and hands them over, bound and not yet listening.
"""

from __future__ import annotations

import logging
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from trioserve.server.first_bytes import defer_accept
from trioserve.server.listener import DirectListener, Liveness, TakenOverConnections
from trioserve.server.sockets import HEALTH_PORT_HOST, AdminSocket, bind_health_port

__all__ = ["Listening", "open_listening"]

log = logging.getLogger(__name__)


@dataclass
class Listening:
    """Each kind of listener ``serve`` serves, with the handler it needs, and every listening
    socket behind them."""

    backlog: int
    # The main port: Hypercorn's connections (TLS or not).
    main: list[trio.abc.Listener[Any]] = field(default_factory=list)
    # The admin socket: Hypercorn's connections, each marked with its peer.
    admin: list[trio.abc.Listener[trio.SocketStream]] = field(default_factory=list)
    admin_socket: AdminSocket | None = None
    # The health port: /health only, never Hypercorn.
    health: list[trio.abc.Listener[trio.SocketStream]] = field(default_factory=list)
    # The accept take-over threads (they also keep the ``Liveness`` ticking).
    taken_over: list[TakenOverConnections] = field(default_factory=list)
    # Every listening socket, closed at the end whatever happened (twice is harmless).
    sockets: list[socket.socket] = field(default_factory=list)

    def accept_at_once(self, sock: socket.socket, liveness: Liveness) -> list[Any]:
        """The bound ``sock`` listening, as listeners with /health at accept time
        (``listener.py``)."""
        sock.listen(self.backlog)
        sock.setblocking(False)
        defer_accept(sock)
        thread = TakenOverConnections(sock, liveness)
        self.taken_over.append(thread)
        # The loop accepts for itself while it can; the thread takes what it leaves.
        return [DirectListener(sock, thread), thread]

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        if self.admin_socket is not None:
            self.admin_socket.remove()


def open_listening(
    *,
    secure: list[socket.socket],
    insecure: list[socket.socket],
    tls: ssl.SSLContext | None,
    backlog: int,
    liveness: Liveness,
    admin_socket: Path | None,
    admin_group: str,
    health_port: int,
) -> Listening:
    """Listen on the main port's bound sockets (``secure`` with ``tls``, ``insecure`` with
    /health at accept time), then open the admin socket and the health port. All or none: on
    a failure every socket is closed, those passed in included, and the admin socket's file
    removed.

    The admin socket comes before the health port, so that a health port that cannot be had
    leaves no admin socket behind only because this cleanup works (tests/test_health_port.py).
    """
    listening = Listening(backlog=backlog)
    listening.sockets += secure + insecure
    try:
        for sock in secure:
            assert tls is not None
            # Upstream's TLS listener (``hypercorn.trio.run.worker_serve``): the handshake
            # happens in the connection's task, inside Hypercorn's ``TCPServer.run`` (bounded
            # by its ``ssl_handshake_timeout``).
            sock.listen(backlog)
            defer_accept(sock)
            listening.main.append(
                trio.SSLListener(
                    trio.SocketListener(trio.socket.from_stdlib_socket(sock)),
                    tls,
                    https_compatible=True,
                )
            )
        for sock in insecure:
            listening.main += listening.accept_at_once(sock, liveness)
        if admin_socket is not None:
            listening.admin_socket = AdminSocket(admin_socket, admin_group, backlog)
            listening.sockets.append(listening.admin_socket.socket)
            listening.admin.append(
                trio.SocketListener(trio.socket.from_stdlib_socket(listening.admin_socket.socket))
            )
            log.info("admin socket: %s", admin_socket)
        if health_port:
            sock = bind_health_port(health_port)
            listening.sockets.append(sock)
            listening.health += listening.accept_at_once(sock, liveness)
            log.info("health port: GET /health on http://%s:%d", HEALTH_PORT_HOST, health_port)
    except BaseException:
        listening.close()
        raise
    return listening
