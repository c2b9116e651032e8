"""Loopback ports: a free one from the kernel, and private ranges for model children."""

from __future__ import annotations

import os
import socket

# Model ports come from below the kernel's ephemeral ports (32768 and up), which outgoing
# connections of any program take at random. The pool is cut in slots of _SLOT ports.
_POOL_FIRST, _POOL_END, _SLOT = 22000, 32760, 40


def _share() -> tuple[int, int, int]:
    """``(first, end, start)``: the part of the pool this process hands out, and where.

    A pytest-xdist worker (``PYTEST_XDIST_WORKER`` gwN of ``PYTEST_XDIST_WORKER_COUNT``) has
    slots of its own, so the workers of one run never hand out the same port. Any other process
    (a serial run, a benchmark) takes the whole pool, starting at a place picked by its pid, so
    that test runs sharing the machine rarely meet; when they do, the daemon's own checks
    (never a bound port, the listener must be the child's) keep them apart.
    """
    slots = (_POOL_END - _POOL_FIRST) // _SLOT
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw"):
        count = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
        per_worker = slots // count
        first = _POOL_FIRST + int(worker.removeprefix("gw")) % count * per_worker * _SLOT
        return first, first + per_worker * _SLOT, first
    start = _POOL_FIRST + (os.getpid() * 7) % slots * _SLOT
    return _POOL_FIRST, _POOL_FIRST + slots * _SLOT, start


_FIRST, _END, _next = _share()


def free_port() -> int:
    """A port nothing is bound to right now, picked by the kernel (for a daemon's listener)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_range(size: int = _SLOT) -> list[int]:
    """``[first, last]``: ``size`` model ports, none of them handed out before in this run."""
    global _next
    if _next + size > _END:
        _next = _FIRST
    first = _next
    _next += size
    return [first, first + size - 1]


def bindable(port: int, *, reuse_address: bool = False) -> bool:
    """Whether a bind to ``port`` succeeds now. Without ``reuse_address`` a port that closed
    connections left in TIME_WAIT counts as taken, as the model port allocator sees it; with
    it (as every server binds), only a bound socket holds the port."""
    with socket.socket() as probe:
        if reuse_address:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
