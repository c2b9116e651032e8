"""A streamed answer's usage is found however long the event that carries it (llama-server's
final event has its ``timings``; many choices make it longer still)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.config import make_config, model_server_cmd
from tests.support.daemon import running_daemon
from tests.support.http import chat
from trioserve.gateway import usage as usage_module
from trioserve.gateway.usage import StreamUsage


def final_event(prompt: int, completion: int, padding: int, *, newline: bytes = b"\n") -> bytes:
    body = {
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion},
        "timings": {"notes": "x" * padding},
    }
    return b"data: " + json.dumps(body).encode() + newline * 2


def stream(padding: int, newline: bytes = b"\n") -> bytes:
    words = b"".join(
        b'data: {"choices":[{"index":0,"delta":{"content":"w"}}]}' + newline * 2 for _ in range(50)
    )
    return words + final_event(7, 50, padding, newline=newline) + b"data: [DONE]" + newline * 2


def found(data: bytes, size: int) -> tuple[int, int] | None:
    finder = StreamUsage()
    for at in range(0, len(data), size):
        finder.feed(data[at : at + size])
    return finder.usage()


@pytest.mark.parametrize(
    ("padding", "size"),
    [(padding, size) for padding in (0, 5_000) for size in (1, 7, 100, 4096, 65536)]
    + [(200_000, size) for size in (7, 100, 4096, 65536)],
)
def test_usage_is_found_in_a_final_event_of_any_length(padding: int, size: int) -> None:
    assert found(stream(padding), size) == (7, 50)


@pytest.mark.parametrize("size", [1, 3, 64, 65536])
def test_usage_is_found_with_crlf_event_ends(size: int) -> None:
    assert found(stream(10_000, newline=b"\r\n"), size) == (7, 50)


def test_usage_in_a_last_event_without_its_blank_line() -> None:
    data = stream(10_000).removesuffix(b"data: [DONE]\n\n").removesuffix(b"\n\n")
    assert found(data, 1000) == (7, 50)


def test_an_event_over_the_bound_is_skipped_and_later_ones_still_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(usage_module, "MAX_EVENT_BYTES", 1000)
    huge = final_event(1, 1, 50_000)
    data = huge + final_event(3, 4, 10) + b"data: [DONE]\n\n"
    assert found(data, 997) == (3, 4)
    # The kept bytes stay bounded while the huge event goes by.
    finder = StreamUsage()
    for at in range(0, len(huge) - 10, 997):
        finder.feed(huge[at : at + 997])
        assert len(finder._event) <= 1000 + 997


# A model that streams 20 words and a final event with usage and 20 KB of timings.
LONG_FINAL_EVENT = """
self.send_response(200)
self.send_header("content-type", "text/event-stream")
self.send_header("transfer-encoding", "chunked")
self.end_headers()
def event(obj):
    piece = b"data: " + json.dumps(obj).encode() + b"\\n\\n"
    self.wfile.write(b"%x\\r\\n%s\\r\\n" % (len(piece), piece))
for _ in range(20):
    event({"choices": [{"index": 0, "delta": {"content": "w "}}]})
event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
       "usage": {"prompt_tokens": 11, "completion_tokens": 20},
       "timings": {"notes": "t" * 20000}})
piece = b"data: [DONE]\\n\\n"
self.wfile.write(b"%x\\r\\n%s\\r\\n0\\r\\n\\r\\n" % (len(piece), piece))
self.wfile.flush()
"""


async def test_a_relayed_stream_counts_usage_from_a_long_final_event(state_dir: Path) -> None:
    config = make_config(state_dir, {"m": {"cmd": model_server_cmd(LONG_FINAL_EVENT)}})
    async with running_daemon(config) as (_info, client):
        response = await client.post("/v1/chat/completions", json=chat("m", stream=True))
        assert response.status_code == 200
        assert response.text.endswith("data: [DONE]\n\n")
        users = (await client.get("/admin/status")).json()["users"]
        assert users["anonymous"]["prompt_tokens"] == 11, users
        assert users["anonymous"]["completion_tokens"] == 20, users


def test_usage_null_in_later_events_does_not_hide_the_real_one() -> None:
    # OpenAI's chunks carry "usage": null until the one that has it; a backend may send more
    # after it.
    word = b'data: {"choices":[{"index":0,"delta":{"content":"w"}}],"usage": null}\n\n'
    data = word * 5 + final_event(7, 50, 100) + word + b"data: [DONE]\n\n"
    for size in (1, 13, len(data)):
        assert found(data, size) == (7, 50), size


def test_a_blank_line_of_lf_then_crlf_ends_an_event() -> None:
    data = b'data: {"choices":[]}\n\r\n' + final_event(7, 50, 10, newline=b"\r\n")
    data += b"data: [DONE]\n\r\n"
    assert found(data, 5) == (7, 50)
