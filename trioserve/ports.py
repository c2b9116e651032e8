"""Ports for model children: never one a live child holds, never one another program bound."""

from __future__ import annotations

import socket

__all__ = ["NoFreePort", "PortAllocator"]


class NoFreePort(RuntimeError):
    pass


class PortAllocator:
    """Hands out ports from ``[first, last]`` round-robin.

    Round-robin rather than lowest-first: a port a child just released may still be in
    TIME_WAIT or about to be reused by the next child of the same model, which confuses logs.
    """

    def __init__(self, first: int, last: int, host: str = "127.0.0.1") -> None:
        self.first = first
        self.last = last
        self.host = host
        self._held: set[int] = set()
        self._next = first

    def allocate(self) -> int:
        span = self.last - self.first + 1
        for _ in range(span):
            port = self._next
            self._next = self.first + (port - self.first + 1) % span
            if port in self._held:
                continue
            if not self._is_free(port):
                continue
            self._held.add(port)
            return port
        raise NoFreePort(
            f"no free port in port_range [{self.first}, {self.last}]: "
            f"{len(self._held)} held by models, the rest bound by other programs"
        )

    def release(self, port: int) -> None:
        self._held.discard(port)

    def held(self) -> frozenset[int]:
        return frozenset(self._held)

    def _is_free(self, port: int) -> bool:
        # A bind test is a quick syscall, not blocking I/O, so it is fine on the event loop.
        # No SO_REUSEADDR: we want to see a port someone else listens on as taken.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((self.host, port))
            except OSError:
                return False
        return True
