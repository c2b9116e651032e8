"""The answers to a ``Generation``, as bytes: the non-streaming JSON body, and the server-sent
events of a stream (the events sent one token apart, and the stream's end). Pure: no I/O.

A plain stream (one choice of text, nothing else: ``Generation.plain``) is the benchmarks' hot
path, so its chunks are built by string formatting (``ChunkFormat``, ``plain_stream``), each
distinct token encoded once; everything else goes through ``Reply``, with ``json.dumps`` per
chunk.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import accumulate
from typing import Any, Final

from trioserve.backends.echo.generation import Generation, GenerationKind
from trioserve.backends.echo.model import reply_tokens
from trioserve.backends.echo.wire import ERROR_TYPES

__all__ = ["ChunkFormat", "Reply", "plain_stream"]

_DONE: Final = b"data: [DONE]\n\n"


def plain_stream(
    generation: Generation, ident: str, created: int, model_json: str
) -> tuple[Iterator[bytes], bytes]:
    """The events of a plain stream, one per token, built as they are sent; and its end: the
    finish chunk, the usage, ``[DONE]``. ``model_json`` is the model's name as a JSON string."""
    chunks = ChunkFormat(generation.kind, ident, created, model_json)
    events = (
        chunks.first(token) if index == 0 else chunks.token(token)
        for index, token in enumerate(reply_tokens(generation.text, generation.count))
    )
    return events, chunks.final(generation.usage, separate=generation.include_usage) + _DONE


class Reply:
    """Everything but the plain streamed answer: the non-streaming answer of any request, and
    the stream of one with ``n``, ``tools``, ``logprobs`` or ``echo_error_after``.

    Built with ``json.dumps`` per chunk, which is why plain streams never come here.
    """

    def __init__(self, generation: Generation, ident: str, created: int, model: str) -> None:
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
            "type": ERROR_TYPES.get(code, "server_error"),
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


class ChunkFormat:
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
