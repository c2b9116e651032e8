"""A non-streaming answer assembled from the stream the backend sent instead: OpenAI's chat
and text completions, the Responses API (``assemble_responses``) and Anthropic's Messages
(``assemble_messages``).

llama-server notices that a client went away only while it writes a stream (a non-streaming
request keeps its slot to the end, llama.cpp #13262), so the relay asks for a stream even when
its client did not (``upstream_body``) and gives the client the answer it asked for, built here
from the events (``Assembler``). Pure: no trio, no I/O; the relay feeds whatever one upstream
read brought, so the SSE framing may be split anywhere.

It runs for every token of a non-streaming answer, so an event costs one JSON decode plus a
merge that appends strings to lists (``assemble_choice``, ``assemble_messages``), and the
answer's JSON is built once, at the end: the decode, which any relay that reads the events
pays, stays most of an event's cost.

Errors: a backend that answers with another status, or not with ``text/event-stream``, is passed
through unchanged. An error event ends the answer with the status and body the backend would
have answered without streaming (``assemble_errors``): for a chat or completion stream, ``data:
{"error": {...}}``, with the status llama-server and vLLM put in the error's ``code`` number
(llama-server's non-streaming status *is* that code), else the one its OpenAI ``type`` names,
else 500. A stream that ends before its end (``data: [DONE]``; ``event: response.completed`` or
``response.incomplete``; ``event: message_stop``), or carries an event that is not the API's,
raises ``BrokenStream`` (a 502 ``upstream_error``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

from trioserve.errors import UpstreamError
from trioserve.gateway.assemble_choice import MergedChoice
from trioserve.gateway.assemble_errors import error_status
from trioserve.gateway.assemble_messages import MessagesAnswer
from trioserve.gateway.assemble_responses import ResponsesAnswer
from trioserve.gateway.usage import generated, usage_of

__all__ = [
    "ASSEMBLED_PATHS",
    "Assembled",
    "Assembler",
    "BrokenStream",
    "Kind",
    "error_status",
    "upstream_body",
]

Kind = Literal["chat", "completion", "responses", "messages"]

# The paths whose non-streaming requests are sent upstream as streams, and what they answer.
ASSEMBLED_PATHS: Final[dict[str, Kind]] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completion",
    "/v1/responses": "responses",
    "/v1/messages": "messages",
}

_OBJECT: Final[dict[Kind, str]] = {"chat": "chat.completion", "completion": "text_completion"}
# How each kind's stream ends, for the message of a stream cut before.
_END: Final[dict[Kind, str]] = {
    "chat": "'data: [DONE]'",
    "completion": "'data: [DONE]'",
    "responses": "'event: response.completed'",
    "messages": "'event: message_stop'",
}
_JSON: Final = b"application/json"
_DONE: Final = b"[DONE]"
_STREAM_WITH_USAGE: Final = b',"stream":true,"stream_options":{"include_usage":true}}'
# The Responses and Messages APIs always end their streams with the usage, and have no
# stream_options for it (the Responses API's are about obfuscation; llama-server ignores them).
_STREAM: Final = b',"stream":true}'
# Top-level chunk fields that are not copied as they come: the answer's own, and OpenAI's
# ``obfuscation`` (random padding against length side channels), meaningful only in a stream.
_NOT_EXTRA: Final = frozenset(
    {"id", "object", "created", "model", "choices", "usage", "obfuscation"}
)
_decode = json.JSONDecoder().decode


def upstream_body(kind: Kind, body: dict[str, Any], raw: bytes | None = None) -> bytes:
    """The client's non-streaming request of ``kind`` as a streamed one that ends with its
    usage: ``"stream": true``, and for chat and completions ``stream_options.include_usage``.

    Everything else the client sent is kept, ``stream_options`` keys included. ``raw``, the
    bytes ``body`` was parsed from, saves encoding it again when the client sent neither
    ``stream`` nor ``stream_options``: the keys are then added at its end. A copy costs far
    less than encoding again, which for a body of megabytes would stall the event loop.
    """
    openai = kind == "chat" or kind == "completion"
    if raw is not None and body and "stream" not in body and "stream_options" not in body:
        end = raw.rfind(b"}")
        if end > 0 and not raw[end + 1 :].strip():
            added = _STREAM_WITH_USAGE if openai else _STREAM
            return b"".join((memoryview(raw)[:end], added))  # one copy
    if not openai:
        return json.dumps({**body, "stream": True}, separators=(",", ":")).encode()
    options = body.get("stream_options")
    merged = {**options, "include_usage": True} if isinstance(options, dict) else None
    streamed = {
        **body,
        "stream": True,
        "stream_options": merged if merged is not None else {"include_usage": True},
    }
    # ensure_ascii (the default): a lone surrogate escape the client sent stays valid JSON.
    return json.dumps(streamed, separators=(",", ":")).encode()


class BrokenStream(UpstreamError):
    """The backend's stream cannot become an answer: cut short, or not the API's events."""


@dataclass(frozen=True, slots=True)
class Assembled:
    """What the client gets: status, content type and body, ready to send."""

    status: int
    content_type: bytes
    body: bytes


class Assembler:
    """Feed it the upstream body as it arrives; ``result()`` is the non-streaming answer.

    ``status`` and ``content_type`` are the upstream response's: anything but a 200 event
    stream is collected and passed through unchanged. ``clock`` (seconds since the epoch)
    dates a Responses answer's ``completed_at`` when its stream did not.
    """

    def __init__(
        self,
        kind: Kind,
        status: int = 200,
        content_type: str = "text/event-stream",
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.kind = kind
        self._api: ResponsesAnswer | MessagesAnswer | None = None
        if kind == "responses":
            self._api = ResponsesAnswer(clock)
        elif kind == "messages":
            self._api = MessagesAnswer()
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
        """The ``usage`` object of the answer, as the stream reported it (a chat's last one;
        a response's; a message's, once ``message_delta`` gave its output tokens), or None."""
        return self._usage if self._api is None else self._api.usage

    @property
    def events(self) -> int:
        """The events taken so far (``[DONE]`` included)."""
        return self._events

    @property
    def done(self) -> bool:
        """True once the stream's end or an error event arrived: the rest need not be read."""
        return self._done

    def tokens(self) -> tuple[int, int] | None:
        """(prompt, completion) tokens of the answer, from the usage its stream reported;
        None when it reported none (yet)."""
        return usage_of({"usage": self.usage})

    def counted(self) -> tuple[int, int] | None:
        """What an answer cut short (client gone, deadline) is counted as: ``tokens()``, or
        else ``generated`` from its token events (a chat's every event; a response's
        ``*.delta``, a message's ``content_block_delta`` events) and the prompt tokens
        ``message_start`` reported. A stream that got to its end counts only its usage."""
        found = self.tokens()
        if found is not None or self._done:
            return found
        api = self._api
        if api is None:
            return generated(self._events)
        prompt = usage_of({"usage": api.prompt_usage})
        return generated(api.tokens, prompt[0] if prompt is not None else 0)

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
        name: str | None = None
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                data.append(line[6:] if line[5:6] == b" " else line[5:])
            elif line.startswith(b"event:"):
                name = (line[7:] if line[6:7] == b" " else line[6:]).decode("utf-8", "replace")
            # Anything else is a comment (":"), a field we do not use (id, retry), or the
            # empty line before an event that began after more than one blank line.
        if data:
            self._dispatch(b"\n".join(data), name)

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
                f"the stream ended before {_END[self.kind]} (after {self._events} events)"
            )
        if self._api is not None:
            body = json.dumps(self._api.answer(), separators=(",", ":")).encode()
            return Assembled(200, _JSON, body)
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

    def _dispatch(self, data: bytes, name: str | None = None) -> None:
        self._events += 1
        if self._api is not None:
            self._take(self._api, data, name)
            return
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

    def _take(self, api: ResponsesAnswer | MessagesAnswer, data: bytes, name: str | None) -> None:
        """One event of the Responses or Messages API."""
        if data == _DONE:
            return  # some proxies end these streams so too; the API's own end event counts
        try:
            event = _decode(data.decode())
        except ValueError:  # UnicodeDecodeError included
            raise BrokenStream(f"event {self._events} is not JSON: {data[:200]!r}") from None
        if not isinstance(event, dict):
            raise BrokenStream(f"event {self._events} is not a JSON object: {data[:200]!r}")
        try:
            api.take(name, event, data)
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise BrokenStream(
                f"event {self._events} is not a {self.kind} event ({error!r}): {data[:200]!r}"
            ) from None
        if api.done:
            self._done = True
            if api.error is not None:
                self._error = Assembled(api.error[0], _JSON, api.error[1])

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
