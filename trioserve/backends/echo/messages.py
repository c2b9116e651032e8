"""``/v1/messages`` (Anthropic's Messages API) and ``/v1/messages/count_tokens``, shaped as
llama-server (build 11434) answers them. Pure: no I/O.

The request: ``messages`` (``content`` a string or text blocks), ``system`` (a string or text
blocks), ``max_tokens``, which bounds the reply (``stop_reason`` is ``"max_tokens"`` when it cut
the reply, else ``"end_turn"``), ``stream``, and the test triggers of ``generation``'s docstring
(``echo_error_after``, ``echo_error_code``). The reply echoes the last user message;
``input_tokens`` counts the words of the system prompt and of every message.

The stream sends ``message_start``, ``content_block_start``, a ``content_block_delta`` per
token, ``content_block_stop``, ``message_delta`` (the stop reason and ``usage.output_tokens``)
and ``message_stop``. One that fails ends with Anthropic's error event,
``event: error`` / ``{"type": "error", "error": {"type", "message"}}``, which Anthropic's SDK
raises as an error. (llama-server itself puts its own error object in that event's data.)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from trioserve.backends.echo.options import EchoOptions
from trioserve.backends.echo.request import RequestError, parse_json
from trioserve.backends.echo.wire import content_text, dumps, named_event, words
from trioserve.backends.echo.work import Answer, TextWork

__all__ = ["MessagesWork", "count_tokens_answer", "parse_messages"]

# Anthropic's error types, by status (``echo_error_code``).
_ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


# JSON's names of what a JSON value becomes in Python, for llama-server's words.
_JSON_TYPES: Final = {str: "string", bool: "boolean", list: "array", dict: "object"}


def _texts(payload: dict[str, Any]) -> tuple[list[str], str]:
    """Every text of the request (for the token count) and the last user message's."""
    system = payload.get("system")
    if system is not None and not isinstance(system, str | list):
        message = "'system' must be a string or a list of text blocks."
        raise RequestError(400, message, "invalid_system")
    texts = [content_text(system)]
    messages = payload.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise RequestError(400, "'messages' must be a list of messages.", "invalid_messages")
    last_user = ""
    for message in messages:
        text = content_text(message.get("content"))
        texts.append(text)
        if message.get("role") == "user":
            last_user = text
    return texts, last_user


def parse_messages(body: bytes, options: EchoOptions) -> MessagesWork:
    """The request ``body`` as a ``Work``; a ``RequestError`` for one llama-server refuses."""
    payload = parse_json(body)
    texts, last_user = _texts(payload)
    limit = payload.get("max_tokens")
    if isinstance(limit, float):
        payload["max_tokens"] = int(limit)  # a JSON number, as llama-server reads it
    elif limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
        # llama-server's words, from its JSON library.
        kind = _JSON_TYPES.get(type(limit), "null")
        message = f"Field 'max_tokens': type must be number, but is {kind}"
        raise RequestError(400, message, "invalid_max_tokens")
    return MessagesWork.of(
        payload, options, text=last_user, prompt_tokens=words(*texts), limit_key="max_tokens"
    )


def count_tokens_answer(body: bytes, options: EchoOptions) -> bytes:
    """``/v1/messages/count_tokens``: what ``usage.input_tokens`` of the same request says."""
    texts, _ = _texts(parse_json(body))
    return dumps({"input_tokens": words(*texts)})


def _event(name: str, **value: Any) -> bytes:
    return named_event(name, {"type": name, **value})


@dataclass(frozen=True, slots=True)
class MessagesWork(TextWork):
    """A Messages request."""

    @property
    def _stop_reason(self) -> str:
        return "max_tokens" if self.cut else "end_turn"

    def _message(
        self, number: int, content: list[dict[str, Any]], output: int, stop: str | None
    ) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-echo{number}",  # sic: llama-server's ids are its chat ids
            "type": "message",
            "role": "assistant",
            "content": content,
            "model": self.model,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {
                "cache_read_input_tokens": 0,
                "input_tokens": self.prompt_tokens,
                "output_tokens": output,
            },
        }

    def answer(self, number: int, created: int) -> Answer:
        if self.error_after is not None:
            return self.error_answer()
        content = [{"type": "text", "text": "".join(self.reply())}]
        return Answer(200, dumps(self._message(number, content, self.count, self._stop_reason)))

    def chunks(self, number: int, created: int) -> tuple[Iterable[bytes], bytes]:
        opening = _event("message_start", message=self._message(number, [], 0, None)) + _event(
            "content_block_start", index=0, content_block={"type": "text", "text": ""}
        )
        chunks = [
            _event("content_block_delta", index=0, delta={"type": "text_delta", "text": token})
            for token in self.reply()
        ]
        if chunks:
            chunks[0] = opening + chunks[0]
        end = (
            _event("content_block_stop", index=0)
            + _event(
                "message_delta",
                delta={"stop_reason": self._stop_reason, "stop_sequence": None},
                usage={"output_tokens": self.count},
            )
            + _event("message_stop")
        )
        kind = _ERROR_TYPES.get(self.error_code, "api_error")
        error = _event("error", error={"type": kind, "message": self.error()["message"]})
        return self.failing(chunks, end if chunks else opening + end, error)
