"""A non-streaming OpenAI answer assembled from the stream the backend sent instead.

llama-server notices that a client went away only while it writes a stream (a non-streaming
request keeps its slot to the end, llama.cpp #13262), so the relay asks for a stream even when
its client did not (``upstream_body``) and gives the client the answer it asked for, built here
from the chunks (``Assembler``). Pure: no trio, no I/O; the relay feeds whatever one upstream
read brought, so the SSE framing may be split anywhere.

It runs for every token of a non-streaming answer, so a chunk costs one JSON decode plus a merge
that appends strings to lists (``assemble_choice``), and the answer's JSON is built once, at the
end: the decode, which any relay that reads the chunks pays, stays most of a chunk's cost.

Errors: a backend that answers with another status, or not with ``text/event-stream``, is passed
through unchanged. An event ``data: {"error": {...}}`` ends the answer with that body and the
status the backend would have answered without streaming: llama-server and vLLM put it in the
error's ``code`` number (llama-server's non-streaming status *is* that code); otherwise the
OpenAI error ``type`` names it (``_STATUS_BY_TYPE``); otherwise 500. A stream that ends before
``data: [DONE]``, or carries an event that is not an OpenAI chunk, raises ``BrokenStream``
(a 502 ``upstream_error``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final, Literal

from trioserve.errors import UpstreamError
from trioserve.gateway.assemble_choice import MergedChoice

__all__ = [
    "ASSEMBLED_PATHS",
    "Assembled",
    "Assembler",
    "BrokenStream",
    "Kind",
    "error_status",
    "upstream_body",
]

Kind = Literal["chat", "completion"]

# The paths whose non-streaming requests are sent upstream as streams, and what they answer.
ASSEMBLED_PATHS: Final[dict[str, Kind]] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completion",
}

_OBJECT: Final[dict[Kind, str]] = {"chat": "chat.completion", "completion": "text_completion"}
_JSON: Final = b"application/json"
_DONE: Final = b"[DONE]"
_STREAM_WITH_USAGE: Final = b',"stream":true,"stream_options":{"include_usage":true}}'
# Top-level chunk fields that are not copied as they come: the answer's own, and OpenAI's
# ``obfuscation`` (random padding against length side channels), meaningful only in a stream.
_NOT_EXTRA: Final = frozenset(
    {"id", "object", "created", "model", "choices", "usage", "obfuscation"}
)
_decode = json.JSONDecoder().decode
# OpenAI's and llama-server's error types, for an in-stream error without a numeric code.
_STATUS_BY_TYPE: Final[dict[str, int]] = {
    "invalid_request_error": 400,
    "exceed_context_size_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "rate_limit_error": 429,
    "server_error": 500,
    "not_supported_error": 501,
    "unavailable_error": 503,
    "timeout_error": 504,
}


def upstream_body(body: dict[str, Any], raw: bytes | None = None) -> bytes:
    """The client's non-streaming request as a streamed one that ends with its usage.

    Everything else the client sent is kept, ``stream_options`` keys included. ``raw``, the
    bytes ``body`` was parsed from, saves encoding it again when the client sent neither
    ``stream`` nor ``stream_options``: the two keys are then added at its end. A copy costs far
    less than encoding again, which for a body of megabytes would stall the event loop.
    """
    if raw is not None and body and "stream" not in body and "stream_options" not in body:
        end = raw.rfind(b"}")
        if end > 0 and not raw[end + 1 :].strip():
            return b"".join((memoryview(raw)[:end], _STREAM_WITH_USAGE))  # one copy
    options = body.get("stream_options")
    merged = {**options, "include_usage": True} if isinstance(options, dict) else None
    streamed = {
        **body,
        "stream": True,
        "stream_options": merged if merged is not None else {"include_usage": True},
    }
    # ensure_ascii (the default): a lone surrogate escape the client sent stays valid JSON.
    return json.dumps(streamed, separators=(",", ":")).encode()


def error_status(error: object) -> int:
    """The HTTP status for an in-stream error object (the value of its ``"error"`` key)."""
    if isinstance(error, dict):
        code = error.get("code")
        if isinstance(code, str) and code.isascii() and code.isdigit():
            code = int(code)
        if isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599:
            return code
        kind = error.get("type")
        if isinstance(kind, str) and kind in _STATUS_BY_TYPE:
            return _STATUS_BY_TYPE[kind]
    return 500


class BrokenStream(UpstreamError):
    """The backend's stream cannot become an answer: cut short, or not OpenAI chunks."""


@dataclass(frozen=True, slots=True)
class Assembled:
    """What the client gets: status, content type and body, ready to send."""

    status: int
    content_type: bytes
    body: bytes


class Assembler:
    """Feed it the upstream body as it arrives; ``result()`` is the non-streaming answer.

    ``status`` and ``content_type`` are the upstream response's: anything but a 200 event
    stream is collected and passed through unchanged.
    """

    def __init__(
        self, kind: Kind, status: int = 200, content_type: str = "text/event-stream"
    ) -> None:
        self.kind = kind
        self._passthrough: list[bytes] | None = None
        if status != 200 or not content_type.startswith("text/event-stream"):
            self._passthrough = []
            self._status = status
            self._content_type = content_type.encode("latin-1")
        self._buffer = b""
        self._events = 0
        self._done = False
        self._error: Assembled | None = None
        self._head: dict[str, Any] = {}  # id, created, model: the first value seen
        self._extra: dict[str, Any] = {}
        self._usage: Any = None
        self._choices: dict[int, MergedChoice] = {}

    @property
    def usage(self) -> Any:
        """The last ``usage`` object the stream carried, or None."""
        return self._usage

    @property
    def events(self) -> int:
        """The events taken so far (``[DONE]`` included)."""
        return self._events

    @property
    def done(self) -> bool:
        """True once ``[DONE]`` or an error event arrived: the rest need not be read."""
        return self._done

    def feed(self, data: bytes) -> None:
        """Take the next bytes of the upstream body. Raises ``BrokenStream`` on a bad event."""
        if self._passthrough is not None:
            self._passthrough.append(data)
            return
        if self._done:
            return
        buffer = self._buffer + data if self._buffer else data
        if b"\r" in buffer:
            buffer = _lf_lines(buffer)
        start = 0
        size = len(buffer)
        find = buffer.find
        while not self._done:
            # A blank line ends an event. Nearly every event is one line, "data: {...}": its
            # LF is found by memchr, and its payload is sliced from the buffer at once.
            end = find(b"\n", start)
            if end < 0:
                break
            if end + 1 < size and buffer[end + 1] == 10 and buffer.startswith(b"data: ", start):
                self._dispatch(buffer[start + 6 : end])
                start = end + 2
                continue
            end = find(b"\n\n", start)
            if end < 0:
                break
            self._dispatch_lines(buffer[start:end])
            start = end + 2
        self._buffer = buffer[start:]

    def _dispatch_lines(self, event: bytes) -> None:
        data: list[bytes] = []
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                data.append(line[6:] if line[5:6] == b" " else line[5:])
            # Anything else is a comment (":"), a field we do not use (event, id, retry), or
            # the empty line before an event that began after more than one blank line.
        if data:
            self._dispatch(b"\n".join(data))

    def result(self) -> Assembled:
        """The answer; call it once the upstream body has ended."""
        if self._passthrough is not None:
            return Assembled(self._status, self._content_type, b"".join(self._passthrough))
        if not self._done and self._buffer:
            # The body has ended, and with it the last line and event, even unterminated.
            self.feed(b"\n\n")
        if self._error is not None:
            return self._error
        if not self._done:
            raise BrokenStream(
                f"the stream ended before 'data: [DONE]' (after {self._events} events)"
            )
        if not self._head:
            raise BrokenStream("the stream ended without a single answer chunk")
        chat = self.kind == "chat"
        answer: dict[str, Any] = {
            "id": self._head.get("id"),
            "object": _OBJECT[self.kind],
            "created": self._head.get("created"),
            "model": self._head.get("model"),
            "choices": [self._choices[i].to_json(chat=chat) for i in sorted(self._choices)],
        }
        if self._usage is not None:
            answer["usage"] = self._usage
        answer.update(self._extra)
        return Assembled(200, _JSON, json.dumps(answer, separators=(",", ":")).encode())

    # -- per event -----------------------------------------------------------------------------

    def _dispatch(self, data: bytes) -> None:
        self._events += 1
        if data == _DONE:
            self._done = True
            return
        try:
            # On a str: json.loads of bytes first guesses their encoding, on every chunk.
            chunk = _decode(data.decode())
        except ValueError:  # UnicodeDecodeError included
            raise BrokenStream(f"event {self._events} is not JSON: {data[:200]!r}") from None
        if not isinstance(chunk, dict):
            raise BrokenStream(f"event {self._events} is not a JSON object: {data[:200]!r}")
        if chunk.get("error") is not None:
            self._done = True
            self._error = Assembled(error_status(chunk["error"]), _JSON, bytes(data))
            return
        try:
            self._merge(chunk)
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise BrokenStream(
                f"event {self._events} is not an OpenAI chunk ({error!r}): {data[:200]!r}"
            ) from None

    def _merge(self, chunk: dict[str, Any]) -> None:
        if not self._head:
            self._head = {key: chunk.get(key) for key in ("id", "created", "model")}
        choices = self._choices
        for choice in chunk.get("choices") or ():
            index: int = choice.get("index", 0)
            state = choices.get(index)
            if state is None:
                if not isinstance(index, int):
                    raise TypeError(f"choice index {index!r}")
                state = choices[index] = MergedChoice(index)
            state.merge(choice)
        usage = chunk.get("usage")
        if usage is not None:
            self._usage = usage
        keys = chunk.keys() - _NOT_EXTRA
        if keys:
            extra = self._extra
            if not keys <= extra.keys():  # first seen: they keep the chunk's order
                extra.update((key, chunk[key]) for key in chunk if key in keys and key not in extra)
            for key in keys:
                # The last value (llama-server's timings come with the last chunk), but a
                # field the backend stops sending (null) keeps the value it had.
                value = chunk[key]
                if value is not None:
                    extra[key] = value


def _lf_lines(buffer: bytes) -> bytes:
    """SSE lines may end in CRLF, LF or CR: all become LF. A CR at the very end is kept as it
    is, since the LF of its CRLF may be in the next read."""
    held = buffer.endswith(b"\r")
    if held:
        buffer = buffer[:-1]
    buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return buffer + b"\r" if held else buffer
