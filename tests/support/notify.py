"""systemd's end of NOTIFY_SOCKET: a bound datagram socket that keeps what it receives."""

from __future__ import annotations

import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class NotifyPeer:
    """A bound datagram socket standing in for systemd, and its NOTIFY_SOCKET spelling."""

    sock: socket.socket
    notify_socket: str
    received: list[tuple[float, str]] = field(default_factory=list)  # (arrival, message)

    @classmethod
    def bind(cls, kind: str, short_dir: Path) -> NotifyPeer:
        """A peer on a path in ``short_dir`` (``kind`` "path") or an abstract name."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if kind == "path":
            address = notify_socket = str(short_dir / "notify")
        else:
            name = f"trioserve-test-{uuid.uuid4().hex}"
            address, notify_socket = "\0" + name, "@" + name
        sock.bind(address)
        return cls(sock, notify_socket)

    def drain(self) -> list[bytes]:
        """Every datagram queued so far, without blocking (trio's clock may be mocked)."""
        queued = []
        # Non-blocking: with a timeout left by ``collect``, Python would wait it out.
        self.sock.settimeout(0.0)
        while True:
            try:
                queued.append(self.sock.recv(65536))
            except BlockingIOError:
                return queued

    def collect_queued(self) -> None:
        """Keep what has arrived so far, without waiting (all a sender that exited has sent)."""
        self.received.extend((time.monotonic(), data.decode()) for data in self.drain())

    def collect(self, seconds: float) -> None:
        """Keep what arrives for ``seconds`` (real time: the sender is another process)."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return
            self.received.append((time.monotonic(), data.decode()))

    def collect_until(self, field_text: str, timeout: float = 20) -> None:
        """Collect until a message has the line ``field_text``; fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not any(field_text in message.split("\n") for _, message in self.received):
            assert time.monotonic() < deadline, f"no {field_text}; got {self.messages}"
            self.collect(0.1)

    @property
    def messages(self) -> list[str]:
        return [message for _, message in self.received]
