"""A bounded buffer of a child's output lines: memory stays bounded whatever the child writes."""

from __future__ import annotations

from collections import deque

__all__ = ["OutputRing"]


def _sequence_length(lead: int) -> int:
    """Bytes in the UTF-8 sequence that ``lead`` begins (1 for anything else)."""
    if lead & 0xE0 == 0xC0:
        return 2
    if lead & 0xF0 == 0xE0:
        return 3
    if lead & 0xF8 == 0xF0:
        return 4
    return 1


def _utf8_cut(data: bytes | bytearray, limit: int) -> int:
    """Where to cut ``data`` at most ``limit`` bytes in without splitting a UTF-8 character.

    If the last character before ``limit`` is incomplete, the cut moves back to its first
    byte. Bytes that are not UTF-8 anyway are cut at ``limit``.
    """
    for back in range(1, 4):
        i = limit - back
        if i <= 0:
            break
        if data[i] & 0xC0 == 0x80:  # a continuation byte: its lead is further back
            continue
        return i if i + _sequence_length(data[i]) > limit else limit
    return limit


class OutputRing:
    """Keeps the last ``max_lines`` lines, at most ``max_bytes`` of them in all.

    Bytes are split on ``\\n``; a line longer than ``max_line_bytes`` is cut into pieces (at a
    UTF-8 character boundary) so one endless line (a child writing 50 MB without a newline)
    cannot grow memory. Invalid UTF-8 is replaced, never raised. Sizes are counted in the bytes
    the child wrote.
    """

    def __init__(
        self, max_lines: int = 2000, max_bytes: int = 1 << 20, max_line_bytes: int = 16 << 10
    ) -> None:
        if max_lines < 1 or max_bytes < 1 or max_line_bytes < 1:
            raise ValueError("OutputRing limits must be >= 1")
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.max_line_bytes = max_line_bytes
        self._lines: deque[tuple[str, int]] = deque()
        self._size = 0
        self._partial = bytearray()
        # Total lines ever completed: lets `logs --follow` ask for "what is new since N".
        self.total_lines = 0

    @property
    def size(self) -> int:
        """Bytes held: the kept lines plus the unfinished last one."""
        return self._size + len(self._partial)

    def feed(self, data: bytes | bytearray) -> None:
        self._partial += data
        while True:
            cut = self._partial.find(b"\n")
            if cut < 0:
                break
            self._push(bytes(self._partial[:cut]))
            del self._partial[: cut + 1]
        while len(self._partial) >= self.max_line_bytes:
            cut = _utf8_cut(self._partial, self.max_line_bytes)
            self._push(bytes(self._partial[:cut]))
            del self._partial[:cut]

    def close(self) -> None:
        """The stream ended: keep a last line that had no newline."""
        if self._partial:
            self._push(bytes(self._partial))
            self._partial.clear()

    def _push(self, raw: bytes) -> None:
        line = raw.decode("utf-8", errors="replace").rstrip("\r")
        self._lines.append((line, len(raw)))
        self._size += len(raw)
        self.total_lines += 1
        while self._lines and (len(self._lines) > self.max_lines or self._size > self.max_bytes):
            self._size -= self._lines.popleft()[1]

    def tail(self, n: int | None = None) -> list[str]:
        """The last ``n`` lines (all kept lines when ``n`` is None), the unfinished one last."""
        lines = [line for line, _ in self._lines]
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
        return [line for line, _ in list(self._lines)[-new:]], self.total_lines

    def __len__(self) -> int:
        return len(self._lines)
