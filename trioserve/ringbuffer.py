"""A bounded buffer of a child's output lines: memory stays bounded whatever the child writes."""

from __future__ import annotations

from collections import deque

__all__ = ["OutputRing"]


class OutputRing:
    """Keeps the last ``max_lines`` lines, at most ``max_bytes`` in all.

    Bytes are split on ``\\n``; a line longer than ``max_line_bytes`` is cut into pieces so one
    endless line (a child writing 50 MB without a newline) cannot grow memory. Invalid UTF-8 is
    replaced, never raised.
    """

    def __init__(
        self, max_lines: int = 2000, max_bytes: int = 1 << 20, max_line_bytes: int = 16 << 10
    ) -> None:
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.max_line_bytes = max_line_bytes
        self._lines: deque[str] = deque()
        self._size = 0
        self._partial = bytearray()
        # Total lines ever completed: lets `logs --follow` ask for "what is new since N".
        self.total_lines = 0

    def feed(self, data: bytes | bytearray) -> None:
        self._partial += data
        while True:
            cut = self._partial.find(b"\n")
            if cut < 0:
                break
            self._push(bytes(self._partial[:cut]))
            del self._partial[: cut + 1]
        while len(self._partial) >= self.max_line_bytes:
            self._push(bytes(self._partial[: self.max_line_bytes]))
            del self._partial[: self.max_line_bytes]

    def close(self) -> None:
        """The stream ended: keep a last line that had no newline."""
        if self._partial:
            self._push(bytes(self._partial))
            self._partial.clear()

    def _push(self, raw: bytes) -> None:
        line = raw.decode("utf-8", errors="replace").rstrip("\r")
        self._lines.append(line)
        self._size += len(line)
        self.total_lines += 1
        while self._lines and (len(self._lines) > self.max_lines or self._size > self.max_bytes):
            self._size -= len(self._lines.popleft())

    def tail(self, n: int | None = None) -> list[str]:
        """The last ``n`` complete lines (all kept lines when ``n`` is None), plus a partial one."""
        lines = list(self._lines)
        if self._partial:
            lines.append(bytes(self._partial).decode("utf-8", errors="replace"))
        if n is None:
            return lines
        return lines[-n:] if n > 0 else []

    def since(self, seen_total: int) -> tuple[list[str], int]:
        """Lines completed after the first ``seen_total`` ones, and the new total."""
        new = self.total_lines - seen_total
        if new <= 0:
            return [], self.total_lines
        return list(self._lines)[-new:], self.total_lines

    def __len__(self) -> int:
        return len(self._lines)
