"""An OpenAI Responses API answer (``/v1/responses``) from its stream; part of ``assemble``,
whose ``Assembler`` feeds it every event. Pure.

The stream ends with ``response.completed`` (or ``response.incomplete``) carrying the whole
response object: that object is the answer. The events before it are progress, and only
counted (``tokens``: the ``*.delta`` events, one generated token each). ``response.failed``
and an ``error`` event end it with an error answer in llama-server's non-streaming shape.

What differs from llama-server's own non-streaming answer (build 11434): the key order (its
non-streaming object is sorted by key, its stream's is OpenAI's), ``completed_at`` (absent
from the stream, added here: see ``ResponsesAnswer.take``), and the stream's ``timings``,
which sit beside the response in its event and are not part of the answer (llama-server's
non-streaming answer has none).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Final

from trioserve.gateway.assemble_errors import error_body, error_status, response_error_status

__all__ = ["ResponsesAnswer"]

# The events that end a stream with the response object as the answer.
_ANSWERS: Final = frozenset({"response.completed", "response.incomplete"})


class ResponsesAnswer:
    """A Responses stream as taken so far."""

    __slots__ = ("_clock", "_response", "done", "error", "tokens", "usage")

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._response: dict[str, Any] | None = None
        self.done = False
        self.error: tuple[int, bytes] | None = None
        self.tokens = 0  # delta events: a token each
        self.usage: Any = None  # the response's, once it ended

    @property
    def prompt_usage(self) -> None:
        """A response tells its usage only at its end."""
        return None

    def take(self, name: str | None, event: dict[str, Any], data: bytes) -> None:
        """One event (``name`` from its ``event:`` line, if any; ``data`` its JSON). Raises
        ``KeyError`` or ``TypeError`` on an event that is not the API's shape."""
        kind = event.get("type", name)
        if kind.__class__ is str and kind.endswith(".delta"):  # most events
            self.tokens += 1
            return
        if kind in _ANSWERS:
            response = event["response"]
            if not isinstance(response, dict):
                raise TypeError(f"{kind}'s response is {type(response).__name__}")
            if response.get("status") == "completed" and "completed_at" not in response:
                # OpenAI's own events carry it; llama-server's non-streaming answer has it
                # (the moment it finished, as its stream's created_at), its stream not.
                response = _with_completed_at(response, int(self._clock()))
            self._response = response
            self.usage = response.get("usage")
            self.done = True
        elif kind == "response.failed":
            response = event["response"]
            error = response.get("error") or {}
            code = error.get("code")
            status = response_error_status(code)
            self.usage = response.get("usage")
            self.error = (status, error_body(status, error.get("message"), code))
            self.done = True
        elif kind == "error" or (kind is None and event.get("error") is not None):
            self.error = _error_event(event, data)
            self.done = True
        # response.created, response.in_progress, *.added, *.done: the final response has them.

    def answer(self) -> dict[str, Any]:
        """The response object; once ``done`` without ``error``."""
        assert self._response is not None
        return self._response


def _error_event(event: dict[str, Any], data: bytes) -> tuple[int, bytes]:
    inner = event.get("error")
    if isinstance(inner, dict):
        # llama-server writes an error in a Responses stream as in a chat stream:
        # ``data: {"error": {"code": 500, ...}}``, which is its non-streaming body as well.
        status = error_status(inner)
        if event.keys() == {"error"}:
            return status, bytes(data)
        return status, json.dumps({"error": inner}, separators=(",", ":")).encode()
    # OpenAI's: {"type": "error", "code": "rate_limit_exceeded", "message": ..., "param": ...}
    code = event.get("code")
    status = response_error_status(code)
    return status, error_body(status, event.get("message"), code)


def _with_completed_at(response: dict[str, Any], when: int) -> dict[str, Any]:
    """``response`` with ``completed_at`` next to its ``created_at``."""
    if "created_at" not in response:
        return {**response, "completed_at": when}
    copied: dict[str, Any] = {}
    for key, value in response.items():
        copied[key] = value
        if key == "created_at":
            copied["completed_at"] = when
    return copied
