"""``/v1/responses`` (OpenAI's Responses API) and ``/v1/responses/input_tokens``, shaped as
llama-server (build 11434) answers them. Pure: no I/O.

The request: ``input``, a string or a list of input items (messages whose ``content`` is a
string or ``{"type": "input_text", "text"}`` parts); ``instructions``; ``max_output_tokens``,
which bounds the reply as ``max_tokens`` does for chat; ``stream``; and the test triggers of
``generation``'s docstring (``echo_error_after``, ``echo_error_code``). The reply echoes the last
user message; ``input_tokens`` counts the words of the instructions and of every item.

The stream sends an ``event:`` line with each event and no ``[DONE]``: it ends with
``response.completed``, whose ``response`` carries the ``output`` and the ``usage``. A stream
that fails ends with ``data: {"error": {...}}``, without an ``event:`` line, as llama-server's
``format_oai_sse`` writes it for this API.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from trioserve.backends.echo.options import EchoOptions
from trioserve.backends.echo.request import RequestError, parse_json
from trioserve.backends.echo.wire import (
    content_text,
    data_event,
    dumps,
    named_event,
    timings,
    words,
)
from trioserve.backends.echo.work import Answer, TextWork

__all__ = ["ResponsesWork", "input_tokens_answer", "parse_responses"]


def _texts(payload: dict[str, Any]) -> tuple[list[str], str]:
    """Every text of the input (for the token count) and the last user message's."""
    instructions = payload.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise RequestError(400, "'instructions' must be a string.", "invalid_instructions")
    texts = [instructions] if instructions else []
    items = payload.get("input")
    if items is None:
        raise RequestError(400, "'input' is required", "invalid_input")
    if isinstance(items, str):
        return [*texts, items], items
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        message = "'input' must be a string or a list of input items."
        raise RequestError(400, message, "invalid_input")
    last_user = ""
    for item in items:
        # A message's text; a tool's output is read too, as the model would.
        text = content_text(item.get("content", item.get("output")))
        texts.append(text)
        if item.get("role") == "user":
            last_user = text
    return texts, last_user


def parse_responses(body: bytes, options: EchoOptions) -> ResponsesWork:
    """The request ``body`` as a ``Work``; a ``RequestError`` for one llama-server refuses."""
    payload = parse_json(body)
    texts, last_user = _texts(payload)
    return ResponsesWork.of(
        payload,
        options,
        text=last_user,
        prompt_tokens=words(*texts),
        limit_key="max_output_tokens",
    )


def input_tokens_answer(body: bytes, options: EchoOptions) -> bytes:
    """``/v1/responses/input_tokens``: what ``usage.input_tokens`` of the same request says."""
    texts, _ = _texts(parse_json(body))
    return dumps({"input_tokens": words(*texts), "object": "response.input_tokens"})


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


@dataclass(frozen=True, slots=True)
class ResponsesWork(TextWork):
    """A Responses request."""

    def _usage(self) -> dict[str, Any]:
        return {
            "input_tokens": self.prompt_tokens,
            "output_tokens": self.count,
            "total_tokens": self.prompt_tokens + self.count,
            "input_tokens_details": {"cached_tokens": 0},
        }

    def answer(self, number: int, created: int) -> Answer:
        if self.error_after is not None:
            return self.error_answer()
        message = {
            "content": [_output_text("".join(self.reply()))],
            "id": f"msg_echo{number}",
            "role": "assistant",
            "status": "completed",
            "type": "message",
        }
        response = {
            "completed_at": created,
            "created_at": created,
            "id": f"resp_echo{number}",
            "model": self.model,
            "object": "response",
            "output": [message],
            "status": "completed",
            "usage": self._usage(),
        }
        return Answer(200, dumps(response))

    def chunks(self, number: int, created: int) -> tuple[Iterable[bytes], bytes]:
        ident, item_id = f"resp_echo{number}", f"msg_echo{number}"
        head = {"id": ident, "object": "response", "status": "in_progress"}
        item = {"content": [], "id": item_id, "role": "assistant", "status": "in_progress"}
        opening = b"".join(
            named_event(name, {"type": name, **value})
            for name, value in (
                ("response.created", {"response": head}),
                ("response.in_progress", {"response": head}),
                ("response.output_item.added", {"item": {**item, "type": "message"}}),
                (
                    "response.content_part.added",
                    {"item_id": item_id, "part": {"type": "output_text", "text": ""}},
                ),
            )
        )
        tokens = self.reply()
        delta = "response.output_text.delta"
        chunks = [
            named_event(delta, {"type": delta, "item_id": item_id, "delta": token})
            for token in tokens
        ]
        if chunks:
            chunks[0] = opening + chunks[0]
        text = "".join(tokens)
        done = {
            "type": "message",
            "status": "completed",
            "id": item_id,
            "content": [_output_text(text)],
            "role": "assistant",
        }
        completed = {
            "id": ident,
            "object": "response",
            "created_at": created,
            "status": "completed",
            "model": self.model,
            "output": [done],
            "usage": self._usage(),
        }
        end = b"".join(
            named_event(name, {"type": name, **value})
            for name, value in (
                ("response.output_text.done", {"item_id": item_id, "text": text}),
                ("response.content_part.done", {"item_id": item_id, "part": _output_text(text)}),
                ("response.output_item.done", {"item": done}),
                (
                    "response.completed",
                    {
                        "response": completed,
                        "timings": timings(self.prompt_tokens, self.count, self.token_delay),
                    },
                ),
            )
        )
        error = data_event({"error": self.error()})
        return self.failing(chunks, end if chunks else opening + end, error)
