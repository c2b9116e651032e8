"""What a new connection's first bytes say it is (a complete ``/health`` request, or anything
else), seen with ``MSG_PEEK`` so that Hypercorn still reads them all; and having the kernel
wait for those bytes before it reports the connection (``defer_accept``).

No trio here: the loop's accepts and the take-over thread (``listener``), which runs outside
trio, both use it.
"""

from __future__ import annotations

import contextlib
import socket
from enum import Enum

__all__ = ["MAX_PEEK", "Verdict", "classify", "defer_accept", "peek"]

# A /health request larger than this (absurd headers) is left to Hypercorn.
MAX_PEEK = 8192

_HEALTH_LINES = (
    b"GET /health HTTP/1.1\r\n",
    b"GET /health HTTP/1.0\r\n",
    b"HEAD /health HTTP/1.1\r\n",
    b"HEAD /health HTTP/1.0\r\n",
)


class Verdict(Enum):
    """What a connection's first bytes say it is (the values say when)."""

    HEALTH = "a complete /health request"
    OTHER = "anything else, an unfinished /health head included: Hypercorn's"
    GONE = "closed before a byte"


def classify(peeked: bytes) -> Verdict:
    """What the first bytes of a connection are. An unfinished /health head is Hypercorn's:
    waiting for the rest would mean polling a socket that stays readable, and Hypercorn
    handles slow heads anyway."""
    if not peeked:
        return Verdict.GONE
    for line in _HEALTH_LINES:
        if peeked.startswith(line):
            # Searched from the start: with no headers, the request line's CRLF is half of it.
            end = peeked.find(b"\r\n\r\n")
            headers = peeked[len(line) : end].lower()
            # A body is Hypercorn's business.
            if end < 0 or b"content-length:" in headers or b"transfer-encoding:" in headers:
                return Verdict.OTHER
            return Verdict.HEALTH
    return Verdict.OTHER


def peek(conn: socket.socket) -> tuple[Verdict | None, bytes]:
    """Classify a non-blocking connection by its first bytes, left unread (the verdict is None
    when none arrived yet), and return those bytes."""
    try:
        peeked = conn.recv(MAX_PEEK, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return None, b""
    except OSError:
        return Verdict.GONE, b""
    return classify(peeked), peeked


def defer_accept(listen_socket: socket.socket) -> None:
    """Have the kernel report a connection only once its first bytes are here (Linux's
    TCP_DEFER_ACCEPT, as nginx's ``deferred``): then the peek at accept time can tell a
    /health request at once, and the thread's hand-over is rarely needed. A client that sends
    nothing is still accepted, after about a second."""
    if hasattr(socket, "TCP_DEFER_ACCEPT"):
        with contextlib.suppress(OSError):
            listen_socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
