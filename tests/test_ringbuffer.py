"""The output ring: bounded in lines and bytes, whatever a child writes."""

from __future__ import annotations

import pytest

from trioserve.supervision.ringbuffer import OutputRing


def test_keeps_only_the_last_max_lines() -> None:
    ring = OutputRing(max_lines=3)
    ring.feed(b"".join(b"line %d\n" % i for i in range(10)))
    assert ring.tail() == ["line 7", "line 8", "line 9"]
    assert ring.total_lines == 10


def test_keeps_at_most_max_bytes_dropping_the_oldest() -> None:
    ring = OutputRing(max_lines=1000, max_bytes=100)
    for i in range(50):
        ring.feed(b"%02d-" % i + b"x" * 17 + b"\n")  # 20 bytes a line
    assert ring.size <= 100
    assert ring.tail() == [f"{i:02d}-" + "x" * 17 for i in range(45, 50)]


def test_partial_line_is_completed_by_later_data() -> None:
    ring = OutputRing()
    ring.feed(b"hel")
    assert ring.tail() == ["hel"], "an unfinished line is shown"
    assert ring.total_lines == 0
    ring.feed(b"lo\nwor")
    ring.feed(b"ld\n")
    assert ring.tail() == ["hello", "world"]
    assert ring.total_lines == 2


def test_close_keeps_a_last_line_without_newline() -> None:
    ring = OutputRing()
    ring.feed(b"a\nno newline at the end")
    ring.close()
    assert ring.tail() == ["a", "no newline at the end"]
    assert ring.total_lines == 2


def test_invalid_utf8_is_replaced_not_raised() -> None:
    ring = OutputRing()
    ring.feed(b"\xff\xfe ok \xc3\n")
    assert ring.tail() == ["\ufffd\ufffd ok \ufffd"]


def test_utf8_character_split_across_reads_is_kept_whole() -> None:
    ring = OutputRing()
    ring.feed(b"caf\xc3")
    ring.feed(b"\xa9\r\n")
    assert ring.tail() == ["café"], "and a CRLF ending is stripped"


def test_endless_line_is_cut_into_bounded_pieces() -> None:
    ring = OutputRing(max_lines=100, max_bytes=64 << 10, max_line_bytes=4096)
    chunk = b"x" * 65536
    for _ in range(800):  # 50 MiB without a single newline
        ring.feed(chunk)
    assert ring.size <= ring.max_bytes + ring.max_line_bytes
    assert len(ring) <= 100
    assert all(len(line) <= 4096 for line in ring.tail())


def test_long_line_is_cut_between_utf8_characters() -> None:
    ring = OutputRing(max_line_bytes=1001)  # odd: a plain cut would split a 2-byte character
    ring.feed("é".encode() * 5000)
    ring.close()
    text = "".join(ring.tail())
    assert "\ufffd" not in text
    assert text == "é" * 5000


def test_tail_and_since() -> None:
    ring = OutputRing()
    ring.feed(b"a\nb\nc\n")
    assert ring.tail(2) == ["b", "c"]
    assert ring.tail(0) == []
    seen = ring.total_lines
    ring.feed(b"d\ne\n")
    assert ring.since(seen) == (["d", "e"], 5)
    assert ring.since(5) == ([], 5)


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        OutputRing(max_lines=0)


@pytest.mark.parametrize("size", [999, 1000, 1001, 1002, 1003])
def test_long_line_of_wide_characters_is_never_split_inside_one(size: int) -> None:
    ring = OutputRing(max_line_bytes=size)
    text = "é€😀" * 2000  # 2, 3 and 4 byte characters
    data = text.encode()
    for i in range(0, len(data), 777):  # reads that end anywhere
        ring.feed(data[i : i + 777])
    ring.close()
    assert "".join(ring.tail()) == text
