"""What the app needs of a generated answer, whatever its API (``Work``), and the adapter of
chat and completions to it (``ChatWork``). Pure: no I/O.

A ``Work`` says how long its answer takes (``tokens``, each ``--token-delay``), whether it is
streamed, when it fails (``echo_error_after``); and builds its bytes: the whole answer, or the
chunks sent one token apart and the stream's end. ``runner.Generations`` does the timing, the
same for every API. ``TextWork`` is what the later APIs' works share.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final, Protocol, Self

from trioserve.backends.echo.generation import Generation, parse_generation
from trioserve.backends.echo.model import reply_tokens
from trioserve.backends.echo.options import EchoOptions
from trioserve.backends.echo.replies import Reply, plain_stream
from trioserve.backends.echo.request import error_trigger, token_limit
from trioserve.backends.echo.wire import dumps, llama_error

__all__ = [
    "SSE_HEADERS",
    "Answer",
    "ChatWork",
    "TextWork",
    "Work",
    "parse_chat",
    "parse_completions",
]

SSE_HEADERS: Final = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


@dataclass(frozen=True, slots=True)
class Answer:
    """A whole answer: sent with its Content-Length."""

    status: int
    body: bytes
    content_type: bytes = b"application/json"


class Work(Protocol):
    """A generated answer, as the app times it."""

    @property
    def stream(self) -> bool:
        """Sent as ``chunks``, one token apart; else as one ``answer`` after all tokens."""

    @property
    def slow_start(self) -> bool:
        """``--response-delay`` also applies to the stream, before its head: a stream that
        stands for a non-streaming answer (see ``app``'s docstring)."""

    @property
    def tokens(self) -> int:
        """How many tokens the whole answer takes to generate."""

    @property
    def error_after(self) -> int | None:
        """The answer fails after this many tokens (``echo_error_after``); None: it does not."""

    @property
    def usage(self) -> tuple[int, int]:
        """Prompt and generated tokens, counted by ``/metrics`` once the answer is complete."""

    @property
    def stream_headers(self) -> list[tuple[bytes, bytes]]:
        """The head of the streamed answer (no Content-Length: it is sent chunked)."""

    def answer(self, number: int, created: int) -> Answer:
        """The whole answer of the ``number``-th generation, ``created`` at this Unix time: an
        error status and body if it fails."""

    def chunks(self, number: int, created: int) -> tuple[Iterable[bytes], bytes]:
        """The chunks sent one token apart, and the stream's end (or its error event)."""


@dataclass(frozen=True, slots=True)
class ChatWork:
    """A chat or completions request (``Generation``) as a ``Work``."""

    generation: Generation
    model: str

    @property
    def stream(self) -> bool:
        return self.generation.stream

    @property
    def slow_start(self) -> bool:
        # What trioserve sends upstream for a client's non-streaming request.
        return self.generation.include_usage

    @property
    def tokens(self) -> int:
        return self.generation.count

    @property
    def error_after(self) -> int | None:
        return self.generation.error_after

    @property
    def usage(self) -> tuple[int, int]:
        usage = self.generation.usage
        return usage["prompt_tokens"], usage["completion_tokens"]

    @property
    def stream_headers(self) -> list[tuple[bytes, bytes]]:
        return SSE_HEADERS

    def _ident(self, number: int) -> str:
        return f"{'chatcmpl' if self.generation.kind == 'chat' else 'cmpl'}-echo{number}"

    def answer(self, number: int, created: int) -> Answer:
        status, body = Reply(self.generation, self._ident(number), created, self.model).answer()
        return Answer(status, body)

    def chunks(self, number: int, created: int) -> tuple[Iterable[bytes], bytes]:
        generation, ident = self.generation, self._ident(number)
        if generation.plain:
            return plain_stream(generation, ident, created, json.dumps(self.model))
        return Reply(generation, ident, created, self.model).stream()


def parse_chat(body: bytes, options: EchoOptions) -> ChatWork:
    """A ``/v1/chat/completions`` request as a ``Work``."""
    return ChatWork(parse_generation("chat", body, options.tokens), options.model_name)


def parse_completions(body: bytes, options: EchoOptions) -> ChatWork:
    """A ``/v1/completions`` request as a ``Work``."""
    return ChatWork(parse_generation("completion", body, options.tokens), options.model_name)


@dataclass(frozen=True, slots=True)
class TextWork:
    """What the Responses, Messages and llama.cpp's own APIs share: one reply of text, which
    echoes ``text``; each API's subclass builds its bytes (``answer``, ``chunks``)."""

    text: str
    count: int  # the reply's length in tokens
    cut: bool  # the request's token limit cut the reply: "max_tokens" rather than "end_turn"
    prompt_tokens: int
    stream: bool
    model: str
    error_after: int | None = None
    error_code: int = 500
    token_delay: float = 0.0  # for the answer's ``timings``

    @classmethod
    def of(
        cls,
        payload: dict[str, Any],
        options: EchoOptions,
        *,
        text: str,
        prompt_tokens: int,
        limit_key: str,
        **more: Any,
    ) -> Self:
        """The work of the request ``payload``: its reply echoes ``text``, as long as its
        ``limit_key`` field allows; ``more`` are the subclass's own fields."""
        count, cut = token_limit(payload, limit_key, options.tokens)
        error_after, error_code = error_trigger(payload)
        return cls(
            text,
            count,
            cut,
            prompt_tokens,
            payload.get("stream") is True,
            options.model_name,
            error_after,
            error_code,
            options.token_delay,
            **more,
        )

    @property
    def slow_start(self) -> bool:
        return False

    @property
    def tokens(self) -> int:
        return self.count

    @property
    def usage(self) -> tuple[int, int]:
        return self.prompt_tokens, self.count

    @property
    def stream_headers(self) -> list[tuple[bytes, bytes]]:
        return SSE_HEADERS

    def reply(self) -> list[str]:
        """The reply's tokens."""
        return reply_tokens(self.text, self.count)

    def error(self) -> dict[str, Any]:
        """llama-server's error object for ``echo_error_after``."""
        message = f"echo: failed after {self.error_after} tokens (echo_error_after)"
        return llama_error(self.error_code, message)

    def error_answer(self) -> Answer:
        """The non-streaming answer of a request that fails: llama-server's, with its status."""
        return Answer(self.error_code, dumps({"error": self.error()}))

    def failing(
        self, chunks: list[bytes], end: bytes, error_event: bytes
    ) -> tuple[list[bytes], bytes]:
        """The stream as sent: whole, or cut after ``error_after`` chunks by ``error_event``."""
        if self.error_after is None:
            return chunks, end
        return chunks[: self.error_after], error_event
