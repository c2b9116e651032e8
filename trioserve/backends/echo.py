"""An OpenAI-compatible model server that echoes its input: the default model and the test double.

It is a raw ASGI 3 application served by Hypercorn's trio worker, so it runs on the same stack as
the gateway, and it is the denominator of the benchmarks (1000 concurrent streams, 64 streams at
full speed). Per-token work is therefore a dictionary look-up of pre-encoded bytes and one ASGI
send; JSON is built with string formatting, never with ``json.dumps`` per chunk.

Run it with ``python -m trioserve.backends.echo --port 8081``; ``--help`` lists the options that
make it slow to start, slow to answer, or crash, for fault tests.

Chat and completions requests also understand, as an OpenAI server does:

- ``n``: that many choices; choice ``i`` starts its reply at the input's word ``i``.
- ``tools`` (chat): the reply is a call of each function named there (only the first with
  ``parallel_tool_calls: false``, the named one with a ``tool_choice`` naming a function, none
  with ``"none"``), its ``arguments`` ``{"text": REPLY}``, streamed one token per chunk.
- ``logprobs`` (chat: ``true`` and ``top_logprobs``; completions: the number of alternatives):
  made-up but deterministic log probabilities for each token.
- ``stream_options.include_usage``: usage comes in a last chunk of its own (``"choices": []``),
  not in the chunk with ``finish_reason`` (where it is otherwise, as llama-server puts it).

and two test triggers of its own, in the request body:

- ``echo_error_after: N``: the answer fails after N tokens with llama-server's error shape
  ``{"error": {"code": C, "message", "type"}}``: as the HTTP status C when N is 0 or the request
  is not streamed, else as a last event ``data: {"error": ...}`` (no ``[DONE]``), as
  llama-server ends a stream that fails.
- ``echo_error_code: C``: that status and code (400-599; default 500).

A streamed request that asks for usage is what trioserve sends upstream for a client's
non-streaming request; ``--response-delay`` therefore applies to it too, before its headers,
so that a slow non-streaming answer stays slow when it is relayed as a stream.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Final, Literal

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope, Scope

__all__ = [
    "EchoApp",
    "EchoOptions",
    "EchoStats",
    "build_app",
    "embed",
    "main",
    "parse_args",
    "reply_tokens",
    "serve",
]

# Hypercorn listens with a backlog of 100. A benchmark that opens 1000 streams at once overflows
# that queue; the kernel then drops SYNs and each dropped client waits a full second for the
# retransmit, which would be measured as our latency. Linux caps this at net.core.somaxconn.
_BACKLOG: Final = 4096

# The word a reply is made of when there is nothing to echo.
_EMPTY_INPUT_WORD: Final = "echo"

# Embedding vectors are this long: enough to tell inputs apart, small enough to be cheap.
_EMBEDDING_SIZE: Final = 8

_DONE: Final = b"data: [DONE]\n\n"
_SSE_HEADERS: Final = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]

# Bounds of the request fields, as OpenAI's (n: one request, one answer, not a flood).
_MAX_CHOICES: Final = 128
_MAX_TOP_LOGPROBS: Final = 20
_MAX_COMPLETION_LOGPROBS: Final = 5
# Error types of llama-server's error objects, by status (``echo_error_code``).
_ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    501: "not_supported_error",
    503: "unavailable_error",
}

GenerationKind = Literal["chat", "completion"]


# --------------------------------------------------------------------------------------------
# Options and counters


@dataclass(frozen=True, slots=True)
class EchoOptions:
    """How the echo server behaves; every field has a command-line option of the same name."""

    host: str = "127.0.0.1"
    port: int = 0
    tokens: int = 8
    token_delay: float = 0.0
    startup_delay: float = 0.0
    crash_after: int | None = None
    response_delay: float = 0.0
    model_name: str = "echo"


@dataclass(slots=True)
class EchoStats:
    """Generations (chat and completions requests) by outcome.

    ``started == completed + cancelled + (generations in flight)`` holds at every moment.
    """

    started: int = 0
    completed: int = 0
    cancelled: int = 0

    def to_json(self) -> bytes:
        """The counters as the ``/stats`` endpoint answers them."""
        return (
            f'{{"started":{self.started},"completed":{self.completed},'
            f'"cancelled":{self.cancelled}}}'
        ).encode()


# --------------------------------------------------------------------------------------------
# The pure core: what the model says


def reply_tokens(text: str, count: int, start: int = 0) -> list[str]:
    """The reply to ``text``: its words from word ``start`` on, cycled to ``count`` tokens, each
    but the last with a space.

    >>> reply_tokens("hello world", 3)
    ['hello ', 'world ', 'hello']
    """
    words = text.split() or [_EMPTY_INPUT_WORD]
    last = count - 1
    return [words[(i + start) % len(words)] + (" " if i < last else "") for i in range(count)]


def embed(text: str) -> list[float]:
    """A deterministic vector in [-1, 1] for ``text``, the same in every process.

    Python's ``hash`` is salted per process, so the vector comes from a blake2b digest.
    """
    digest = hashlib.blake2b(text.encode(), digest_size=2 * _EMBEDDING_SIZE).digest()
    return [
        round(int.from_bytes(digest[i : i + 2], "big") / 32767.5 - 1.0, 6)
        for i in range(0, len(digest), 2)
    ]


def _error_body(message: str, code: str, kind: str = "invalid_request_error") -> bytes:
    """OpenAI's error shape, which clients parse to show ``message``."""
    return json.dumps({"error": {"message": message, "type": kind, "code": code}}).encode()


class _RequestError(Exception):
    """A request the server refuses; becomes an OpenAI-shaped error answer."""

    def __init__(
        self, status: int, message: str, code: str, kind: str = "invalid_request_error"
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = _error_body(message, code, kind)


@dataclass(frozen=True, slots=True)
class _Generation:
    kind: GenerationKind
    text: str
    count: int
    stream: bool
    n: int = 1
    tools: tuple[str, ...] = ()  # the functions the reply calls
    logprobs: int | None = None  # alternatives per token; None: not asked for
    include_usage: bool = False
    error_after: int | None = None
    error_code: int = 500

    @property
    def plain(self) -> bool:
        """Streamed on the fast path (``_ChunkFormat``): one choice of text, nothing else."""
        return self.n == 1 and not self.tools and self.logprobs is None and self.error_after is None

    @property
    def usage(self) -> dict[str, int]:
        completion = self.count * self.n * max(1, len(self.tools))
        return _usage(len(self.text.split()), completion)


def _parse_json(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _RequestError(
            400, f"The request body is not valid JSON: {error}", "invalid_json"
        ) from error
    if not isinstance(payload, dict):
        raise _RequestError(400, "The request body must be a JSON object.", "invalid_json")
    return payload


def _message_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: [{"type": "text", "text": "..."}]
        return " ".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _input_text(kind: GenerationKind, payload: dict[str, Any]) -> str:
    if kind == "chat":
        messages = payload.get("messages")
        if not isinstance(messages, list):
            raise _RequestError(400, "'messages' must be a list of messages.", "invalid_messages")
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                return _message_text(message.get("content"))
        return ""
    prompt = payload.get("prompt", "")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(part, str) for part in prompt):
        return " ".join(prompt)
    raise _RequestError(400, "'prompt' must be a string or a list of strings.", "invalid_prompt")


def _optional_int(payload: dict[str, Any], key: str, low: int, high: int) -> int | None:
    value = payload.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        message = f"'{key}' must be an integer from {low} to {high}."
        raise _RequestError(400, message, f"invalid_{key}")
    return value


def _called_tools(payload: dict[str, Any]) -> tuple[str, ...]:
    """The functions a chat reply calls: see the module's docstring."""
    tools = payload.get("tools")
    if not tools:
        return ()
    if not isinstance(tools, list) or not all(
        isinstance(tool, dict)
        and isinstance(tool.get("function"), dict)
        and isinstance(tool["function"].get("name"), str)
        for tool in tools
    ):
        message = '\'tools\' must be a list of {"type": "function", "function": {"name"}}.'
        raise _RequestError(400, message, "invalid_tools")
    names = tuple(tool["function"]["name"] for tool in tools)
    choice = payload.get("tool_choice")
    if choice == "none":
        return ()
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or name not in names:
            raise _RequestError(400, "'tool_choice' names no tool.", "invalid_tool_choice")
        return (name,)
    return names[:1] if payload.get("parallel_tool_calls") is False else names


def _asked_logprobs(kind: GenerationKind, payload: dict[str, Any]) -> int | None:
    if kind == "completion":
        return _optional_int(payload, "logprobs", 0, _MAX_COMPLETION_LOGPROBS)
    asked = payload.get("logprobs")
    if asked not in (None, True, False):
        raise _RequestError(400, "'logprobs' must be a boolean.", "invalid_logprobs")
    top = _optional_int(payload, "top_logprobs", 0, _MAX_TOP_LOGPROBS)
    return (top or 0) if asked else None


def _parse_generation(kind: GenerationKind, body: bytes, tokens: int) -> _Generation:
    payload = _parse_json(body)
    count = tokens
    for key in ("max_tokens", "max_completion_tokens"):
        limit = payload.get(key)
        if limit is None:
            continue
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise _RequestError(400, f"'{key}' must be an integer.", "invalid_max_tokens")
        count = max(0, min(count, limit))
    options = payload.get("stream_options")
    return _Generation(
        kind,
        _input_text(kind, payload),
        count,
        payload.get("stream") is True,
        n=_optional_int(payload, "n", 1, _MAX_CHOICES) or 1,
        tools=_called_tools(payload) if kind == "chat" else (),
        logprobs=_asked_logprobs(kind, payload),
        include_usage=isinstance(options, dict) and options.get("include_usage") is True,
        error_after=_optional_int(payload, "echo_error_after", 0, 1 << 30),
        error_code=_optional_int(payload, "echo_error_code", 400, 599) or 500,
    )


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class _Reply:
    """Everything but the plain streamed answer: the non-streaming answer of any request, and
    the stream of one with ``n``, ``tools``, ``logprobs`` or ``echo_error_after``.

    Built with ``json.dumps`` per chunk, which is why plain streams never come here.
    """

    def __init__(self, generation: _Generation, ident: str, created: int, model: str) -> None:
        self.generation = generation
        self.ident = ident
        self._head = {"id": ident, "object": "", "created": created, "model": model}
        self._tokens = [
            reply_tokens(generation.text, generation.count, start=i) for i in range(generation.n)
        ]
        self._offsets: dict[int, list[int]] = {}

    def answer(self) -> tuple[int, bytes]:
        """Status and body of the non-streaming answer."""
        generation = self.generation
        if generation.error_after is not None:
            return generation.error_code, self._error()
        choices: list[dict[str, Any]] = []
        for index, tokens in enumerate(self._tokens):
            text = "".join(tokens)
            logprobs = None
            if generation.kind == "completion":
                if generation.logprobs is not None:
                    logprobs = self._completion_logprobs(index, tokens)
                choices.append(
                    {"index": index, "text": text, "logprobs": logprobs, "finish_reason": "stop"}
                )
                continue
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if generation.tools:
                arguments = json.dumps({"text": text})
                message["content"] = None
                message["tool_calls"] = [
                    {
                        "id": self._call_id(index, number),
                        "type": "function",
                        "function": {"name": name, "arguments": arguments},
                    }
                    for number, name in enumerate(generation.tools)
                ]
            elif generation.logprobs is not None:
                content = [self._chat_logprob(index, i, t) for i, t in enumerate(tokens)]
                logprobs = {"content": content}
            choices.append(
                {
                    "index": index,
                    "message": message,
                    "logprobs": logprobs,
                    "finish_reason": self._finish_reason,
                }
            )
        obj = "chat.completion" if generation.kind == "chat" else "text_completion"
        answer = {**self._head, "object": obj, "choices": choices, "usage": generation.usage}
        return 200, json.dumps(answer, separators=(",", ":")).encode()

    def stream(self) -> tuple[list[bytes], bytes]:
        """The events sent one token apart (each choice's next chunk), and the end of the stream:
        the finish chunks, the usage, ``[DONE]``; or the error event."""
        generation = self.generation
        per_choice = [self._items(index) for index in range(generation.n)]
        steps: list[bytes] = []
        for step in range(max(map(len, per_choice), default=0)):
            if generation.error_after is not None and step >= generation.error_after:
                break
            steps.append(b"".join(items[step] for items in per_choice if step < len(items)))
        if generation.error_after is not None:
            return steps, b"data: " + self._error() + b"\n\n"
        chunk = "chat.completion.chunk" if generation.kind == "chat" else "text_completion"
        head = {**self._head, "object": chunk}
        ends = []
        for index in range(generation.n):
            if generation.kind == "chat":
                choice = {"index": index, "delta": {}, "logprobs": None}
            else:
                choice = {"index": index, "text": "", "logprobs": None}
            ends.append({**head, "choices": [{**choice, "finish_reason": self._finish_reason}]})
        if generation.include_usage:
            ends.append({**head, "choices": [], "usage": generation.usage})
        else:
            ends[-1]["usage"] = generation.usage
        return steps, b"".join(_event(end) for end in ends) + _DONE

    @property
    def _finish_reason(self) -> str:
        return "tool_calls" if self.generation.tools else "stop"

    def _call_id(self, choice: int, number: int) -> str:
        return f"call-{self.ident}-{choice}-{number}"

    def _error(self) -> bytes:
        generation = self.generation
        code = generation.error_code
        error = {
            "code": code,
            "message": f"echo: failed after {generation.error_after} tokens (echo_error_after)",
            "type": _ERROR_TYPES.get(code, "server_error"),
        }
        return json.dumps({"error": error}, separators=(",", ":")).encode()

    def _items(self, index: int) -> list[bytes]:
        """One choice's chunks, one per token (of its text, or of its calls' arguments)."""
        generation = self.generation
        tokens = self._tokens[index]
        if generation.kind == "completion":
            chunks = []
            for position, token in enumerate(tokens):
                logprobs = None
                if generation.logprobs is not None:
                    logprobs = self._completion_logprobs(index, tokens, position)
                choice = {"index": index, "text": token, "logprobs": logprobs}
                chunks.append(self._chunk(choice))
            return chunks
        deltas: list[tuple[dict[str, Any], Any]] = []
        if generation.tools:
            # Pieces of '{"text": "REPLY"}': its escapes are those of each token in turn.
            pieces = ['{"text": "', *(json.dumps(token)[1:-1] for token in tokens), '"}']
            for number, name in enumerate(generation.tools):
                first = {
                    "index": number,
                    "id": self._call_id(index, number),
                    "type": "function",
                    "function": {"name": name, "arguments": pieces[0]},
                }
                deltas.append(({"tool_calls": [first]}, None))
                deltas.extend(
                    ({"tool_calls": [{"index": number, "function": {"arguments": piece}}]}, None)
                    for piece in pieces[1:]
                )
            deltas[0] = ({"role": "assistant", "content": None, **deltas[0][0]}, None)
        else:
            for position, token in enumerate(tokens):
                logprobs = None
                if generation.logprobs is not None:
                    logprobs = {"content": [self._chat_logprob(index, position, token)]}
                deltas.append(({"content": token}, logprobs))
            if deltas:
                deltas[0] = ({"role": "assistant", **deltas[0][0]}, deltas[0][1])
        return [
            self._chunk({"index": index, "delta": delta, "logprobs": logprobs})
            for delta, logprobs in deltas
        ]

    def _chunk(self, choice: dict[str, Any]) -> bytes:
        obj = "chat.completion.chunk" if self.generation.kind == "chat" else "text_completion"
        return _event({**self._head, "object": obj, "choices": [{**choice, "finish_reason": None}]})

    @staticmethod
    def _logprob(choice: int, position: int) -> float:
        """Made up, deterministic, different for neighbouring tokens and choices."""
        return -0.125 * (1 + (choice + position) % 7)

    def _chat_logprob(self, choice: int, position: int, token: str) -> dict[str, Any]:
        logprob = self._logprob(choice, position)
        top = [
            {"token": name, "logprob": logprob - rank, "bytes": list(name.encode())}
            for rank, name in enumerate(_alternatives(token, self.generation.logprobs or 0))
        ]
        return {
            "token": token,
            "logprob": logprob,
            "bytes": list(token.encode()),
            "top_logprobs": top,
        }

    def _completion_logprobs(
        self, choice: int, tokens: list[str], position: int | None = None
    ) -> dict[str, Any]:
        """The legacy completions shape, for all tokens or the one at ``position``."""
        positions = range(len(tokens)) if position is None else range(position, position + 1)
        starts = self._offsets.get(choice)
        if starts is None:  # where each token starts in the text, computed once per choice
            starts = self._offsets[choice] = list(accumulate(map(len, tokens), initial=0))
        offsets = [starts[i] for i in positions]
        logprobs = [self._logprob(choice, i) for i in positions]
        alternatives = self.generation.logprobs or 0
        return {
            "tokens": [tokens[i] for i in positions],
            "token_logprobs": logprobs,
            "top_logprobs": [
                {
                    name: lp - rank
                    for rank, name in enumerate(_alternatives(tokens[i], alternatives))
                }
                for i, lp in zip(positions, logprobs, strict=True)
            ],
            "text_offset": offsets,
        }


def _alternatives(token: str, count: int) -> list[str]:
    """The token itself, then made-up runners-up: ``count`` in all."""
    return [token, *(f"alt{rank}" for rank in range(1, count))][:count]


def _event(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


class _ChunkFormat:
    """Server-sent-event chunks of one streamed answer, built by string formatting.

    Token texts repeat (the reply cycles the input's words), so each distinct one is encoded once.
    """

    def __init__(self, kind: GenerationKind, ident: str, created: int, model_json: str) -> None:
        if kind == "chat":
            head = (
                f'data: {{"id":"{ident}","object":"chat.completion.chunk","created":{created},'
                f'"model":{model_json},"choices":[{{"index":0,"delta":{{'
            )
            self._first_head = head + '"role":"assistant","content":'
            self._head = head + '"content":'
            self._tail = '},"logprobs":null,"finish_reason":null}]}\n\n'
            self._finish = head + '},"logprobs":null,"finish_reason":"stop"}]'
            obj = "chat.completion.chunk"
        else:
            head = (
                f'data: {{"id":"{ident}","object":"text_completion","created":{created},'
                f'"model":{model_json},"choices":[{{"index":0,"text":'
            )
            self._first_head = self._head = head
            self._tail = ',"logprobs":null,"finish_reason":null}]}\n\n'
            self._finish = head + '"","logprobs":null,"finish_reason":"stop"}]'
            obj = "text_completion"
        self._usage_head = (
            f'data: {{"id":"{ident}","object":"{obj}","created":{created},'
            f'"model":{model_json},"choices":[],"usage":'
        )
        self._cache: dict[str, bytes] = {}

    def first(self, token: str) -> bytes:
        return (self._first_head + json.dumps(token) + self._tail).encode()

    def token(self, token: str) -> bytes:
        chunk = self._cache.get(token)
        if chunk is None:
            chunk = self._cache[token] = (self._head + json.dumps(token) + self._tail).encode()
        return chunk

    def final(self, usage: dict[str, int], *, separate: bool = False) -> bytes:
        """The chunk with ``finish_reason`` and the usage; ``separate``: the usage in a chunk
        of its own after it, as OpenAI sends it for ``stream_options.include_usage``."""
        usage_json = json.dumps(usage, separators=(",", ":"))
        if separate:
            return (self._finish + "}\n\n" + self._usage_head + usage_json + "}\n\n").encode()
        return (self._finish + ',"usage":' + usage_json + "}\n\n").encode()


# --------------------------------------------------------------------------------------------
# The ASGI adapter


async def _start_json(send: ASGISendCallable, status: int, length: int) -> None:
    """The head of a JSON answer of ``length`` bytes."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(length).encode()),
            ],
        }
    )


async def _send_json(send: ASGISendCallable, status: int, body: bytes) -> None:
    await _start_json(send, status, len(body))
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _read_body(receive: ASGIReceiveCallable) -> bytes | None:
    """The request body, or None if the client left before sending all of it."""
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        if message["type"] == "http.request":
            parts.append(message["body"])
            if not message["more_body"]:
                return b"".join(parts)


class _DisconnectWatcher:
    """Cancels a scope as soon as the client goes away.

    Hypercorn does not fail ``send`` once the client is gone (it drops the bytes silently), so
    without this a generation would run to its end for nobody; ``http.disconnect`` arriving on
    ``receive`` is the only prompt signal, and it arrives even while the app is asleep.
    """

    def __init__(self, receive: ASGIReceiveCallable) -> None:
        self._receive = receive
        self.client_left = False

    async def run(self, cancel_scope: trio.CancelScope) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.client_left = True
                cancel_scope.cancel()
                return


_Handler = Callable[[bytes, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class _Route:
    method: str
    handler: _Handler
    needs_model: bool  # answers 503 while the model is "loading", as llama-server does


class EchoApp:
    """The ASGI 3 application. ``stats`` counts generations by outcome."""

    def __init__(self, options: EchoOptions) -> None:
        self.options = options
        self.stats = EchoStats()
        self._chunks_sent = 0
        self._ready_at: float | None = None
        self._model_json = json.dumps(options.model_name)
        self._models_body = json.dumps(
            {
                "object": "list",
                "data": [
                    {
                        "id": options.model_name,
                        "object": "model",
                        "created": int(time.time()),
                        "owned_by": "trioserve",
                    }
                ],
            }
        ).encode()
        self._routes: dict[str, _Route] = {
            "/health": _Route("GET", self._health, needs_model=False),
            "/stats": _Route("GET", self._stats, needs_model=False),
            "/v1/models": _Route("GET", self._models, needs_model=True),
            "/v1/chat/completions": _Route("POST", self._chat, needs_model=True),
            "/v1/completions": _Route("POST", self._completions, needs_model=True),
            "/v1/embeddings": _Route("POST", self._embeddings, needs_model=True),
        }

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if self._ready_at is None:
            # The first call is hypercorn's lifespan startup, i.e. the moment the server starts;
            # taking the time here rather than in __init__ keeps the app free of a running clock.
            self._ready_at = trio.current_time() + self.options.startup_delay
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        # A websocket scope is left unanswered; hypercorn then refuses the handshake.

    @property
    def _loading(self) -> bool:
        return self._ready_at is not None and trio.current_time() < self._ready_at

    async def _lifespan(self, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(
        self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        route = self._routes.get(scope["path"])
        if route is None:
            await _send_json(send, 404, _error_body(f"No route for {scope['path']}.", "not_found"))
            return
        if scope["method"] != route.method:
            message = f"{scope['path']} only accepts {route.method}."
            await _send_json(send, 405, _error_body(message, "method_not_allowed"))
            return
        if route.needs_model and self._loading:
            body = _error_body("Loading model", "model_loading", "unavailable_error")
            await _send_json(send, 503, body)
            return
        request_body = await _read_body(receive)
        if request_body is None:
            return
        try:
            await route.handler(request_body, receive, send)
        except _RequestError as error:
            # Handlers raise only while parsing, before their first send.
            await _send_json(send, error.status, error.body)

    async def _health(
        self, body: bytes, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if self._loading:
            await _send_json(send, 503, b'{"status":"loading"}')
        else:
            await _send_json(send, 200, b'{"status":"ok"}')

    async def _stats(
        self, body: bytes, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        await _send_json(send, 200, self.stats.to_json())

    async def _models(
        self, body: bytes, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        await _send_json(send, 200, self._models_body)

    async def _embeddings(
        self, body: bytes, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        payload = _parse_json(body)
        texts = payload.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
            raise _RequestError(
                400, "'input' must be a string or a list of strings.", "invalid_input"
            )
        words = sum(len(text.split()) for text in texts)
        answer = {
            "object": "list",
            "data": [
                {"object": "embedding", "index": index, "embedding": embed(text)}
                for index, text in enumerate(texts)
            ],
            "model": self.options.model_name,
            "usage": {"prompt_tokens": words, "total_tokens": words},
        }
        await _send_json(send, 200, json.dumps(answer, separators=(",", ":")).encode())

    async def _chat(
        self, body: bytes, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        await self._generate(_parse_generation("chat", body, self.options.tokens), receive, send)

    async def _completions(
        self, body: bytes, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        generation = _parse_generation("completion", body, self.options.tokens)
        await self._generate(generation, receive, send)

    async def _generate(
        self, generation: _Generation, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        self.stats.started += 1
        ident = f"{'chatcmpl' if generation.kind == 'chat' else 'cmpl'}-echo{self.stats.started}"
        finished = False
        try:
            watcher = _DisconnectWatcher(receive)
            last_body = b""
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watcher.run, nursery.cancel_scope)
                # An error before the stream (echo_error_after 0) is an HTTP status, as
                # llama-server answers when a streamed task fails before its first token.
                if generation.stream and generation.error_after != 0:
                    last_body = await self._stream(generation, ident, send)
                else:
                    last_body = await self._compute(generation, ident, send)
                nursery.cancel_scope.cancel()
            if watcher.client_left:
                return
            # The last send stays outside the watched scope: hypercorn delivers http.disconnect
            # from inside it once the response is complete, and a cancellation could land in the
            # middle of hypercorn's connection recycling and break keep-alive.
            await send({"type": "http.response.body", "body": last_body, "more_body": False})
            finished = True
        finally:
            # Whatever stopped a generation early (the client leaving, the server shutting
            # down) counts as cancelled, so that no generation is ever unaccounted for.
            if finished:
                self.stats.completed += 1
            else:
                self.stats.cancelled += 1

    async def _compute(self, generation: _Generation, ident: str, send: ASGISendCallable) -> bytes:
        """Sleeps as long as the whole generation takes, sends the headers, returns the body."""
        options = self.options
        tokens = generation.count
        if generation.error_after is not None:
            tokens = min(tokens, generation.error_after)
        delay = options.response_delay + options.token_delay * tokens
        if delay > 0:
            await trio.sleep(delay)
        reply = _Reply(generation, ident, int(time.time()), options.model_name)
        status, body = reply.answer()
        await _start_json(send, status, len(body))
        return body

    async def _stream(self, generation: _Generation, ident: str, send: ASGISendCallable) -> bytes:
        """Sends the headers and one chunk per token (per choice); returns the stream's end."""
        options = self.options
        if generation.include_usage and options.response_delay > 0:
            # Likely a non-streaming request that trioserve relays as a stream: see the
            # module's docstring.
            await trio.sleep(options.response_delay)
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        created = int(time.time())
        events: Iterable[bytes]
        if generation.plain:
            chunks = _ChunkFormat(generation.kind, ident, created, self._model_json)
            events = (
                chunks.first(token) if index == 0 else chunks.token(token)
                for index, token in enumerate(reply_tokens(generation.text, generation.count))
            )
            end = chunks.final(generation.usage, separate=generation.include_usage) + _DONE
        else:
            events, end = _Reply(generation, ident, created, options.model_name).stream()
        delay = options.token_delay
        crash_after = options.crash_after
        for chunk in events:
            if delay > 0:
                await trio.sleep(delay)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            self._chunks_sent += 1
            if crash_after is not None and self._chunks_sent >= crash_after:
                os._exit(1)  # abrupt on purpose: no cleanup, as a segfaulting llama-server
        return end


def build_app(options: EchoOptions) -> EchoApp:
    """The echo server's ASGI application, for serving in-process or with ``serve``."""
    return EchoApp(options)


# --------------------------------------------------------------------------------------------
# Serving and the command line


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve(
    options: EchoOptions,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the echo app with Hypercorn until ``shutdown_trigger`` returns or we are cancelled.

    ``task_status.started`` receives the bound URLs, e.g. ``["http://127.0.0.1:8081"]``, which
    tells the real port when ``options.port`` is 0.
    """
    config = Config()
    config.bind = [_bind(options.host, options.port)]
    config.accesslog = None
    config.backlog = _BACKLOG
    await hypercorn_serve(
        build_app(options), config, shutdown_trigger=shutdown_trigger, task_status=task_status
    )


async def _serve_until_signalled(options: EchoOptions) -> None:
    # The receiver is open before the socket is bound, so a SIGTERM sent as soon as /health
    # answers can never meet Python's default handler.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:

        async def first_signal() -> None:
            async for _ in signals:
                return

        await serve(options, shutdown_trigger=first_signal)


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be 0 seconds or more, not {text}")
    return value


def parse_args(argv: Iterable[str] | None = None) -> EchoOptions:
    """Options from the command line (``sys.argv[1:]`` when ``argv`` is None)."""
    parser = argparse.ArgumentParser(
        prog="python -m trioserve.backends.echo",
        description="An OpenAI-compatible server whose model echoes the last user message.",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    parser.add_argument("--port", type=int, required=True, help="port to bind (0: any free port)")
    parser.add_argument(
        "--tokens", type=_non_negative_int, default=8, help="reply length in tokens (default: 8)"
    )
    parser.add_argument(
        "--token-delay", type=_seconds, default=0.0, help="seconds per generated token"
    )
    parser.add_argument(
        "--startup-delay",
        type=_seconds,
        default=0.0,
        help="seconds during which /health answers 503 loading, as llama-server does",
    )
    parser.add_argument(
        "--crash-after",
        type=_positive_int,
        default=None,
        help="exit abruptly with status 1 after this many streamed token chunks in total",
    )
    parser.add_argument(
        "--response-delay",
        type=_seconds,
        default=0.0,
        help="extra seconds a non-streaming answer waits, as a slow LLM call (also a streamed "
        "one that asks for usage: how trioserve relays a non-streaming request)",
    )
    parser.add_argument("--model-name", default="echo", help="model id in answers (default: echo)")
    args = parser.parse_args(None if argv is None else list(argv))
    return EchoOptions(
        host=args.host,
        port=args.port,
        tokens=args.tokens,
        token_delay=args.token_delay,
        startup_delay=args.startup_delay,
        crash_after=args.crash_after,
        response_delay=args.response_delay,
        model_name=args.model_name,
    )


def main(argv: list[str] | None = None) -> None:
    """Run the echo server until SIGTERM or SIGINT, then exit 0 after a graceful shutdown."""
    trio.run(_serve_until_signalled, parse_args(argv))


if __name__ == "__main__":
    main()
