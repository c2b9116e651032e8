"""A chat or completions request, parsed into what to generate (``Generation``). Pure: no I/O.

As an OpenAI server does, these requests also understand:

- ``n``: that many choices; choice ``i`` starts its reply at the input's word ``i``.
- ``tools`` (chat): the reply is a call of each function named there (only the first with
  ``parallel_tool_calls: false``, the named one with a ``tool_choice`` naming a function, none
  with ``"none"``), its ``arguments`` ``{"text": REPLY}``, streamed one token per chunk.
- ``logprobs`` (chat: ``true`` and ``top_logprobs``; completions: the number of alternatives):
  made-up but deterministic log probabilities for each token.
- ``stream_options.include_usage``: usage comes in a last chunk of its own (``"choices": []``),
  not in the chunk with ``finish_reason`` (where it is otherwise, as llama-server puts it).

and two test triggers of their own, in the request body (every API that generates text
understands them; ``responses``, ``messages`` and ``native`` say what their failed stream ends
with):

- ``echo_error_after: N``: the answer fails after N tokens with llama-server's error shape
  ``{"error": {"code": C, "message", "type"}}``: as the HTTP status C when N is 0 or the request
  is not streamed, else as a last event ``data: {"error": ...}`` (no ``[DONE]``), as
  llama-server ends a stream that fails.
- ``echo_error_code: C``: that status and code (400-599; default 500).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

from trioserve.backends.echo.model import usage
from trioserve.backends.echo.request import (
    RequestError,
    error_trigger,
    optional_int,
    parse_json,
)
from trioserve.backends.echo.wire import content_text

__all__ = ["Generation", "GenerationKind", "parse_generation"]

GenerationKind = Literal["chat", "completion"]

# Bounds of the request fields, as OpenAI's (n: one request, one answer, not a flood).
_MAX_CHOICES: Final = 128
_MAX_TOP_LOGPROBS: Final = 20
_MAX_COMPLETION_LOGPROBS: Final = 5


@dataclass(frozen=True, slots=True)
class Generation:
    """What one chat or completions request asks the model to generate, and how to answer."""

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
        """Streamed on the fast path (``ChunkFormat``): one choice of text, nothing else."""
        return self.n == 1 and not self.tools and self.logprobs is None and self.error_after is None

    @property
    def usage(self) -> dict[str, int]:
        completion = self.count * self.n * max(1, len(self.tools))
        return usage(len(self.text.split()), completion)


def parse_generation(kind: GenerationKind, body: bytes, tokens: int) -> Generation:
    """The request ``body``; ``tokens`` is the reply's length unless ``max_tokens`` is less.

    Raises ``RequestError`` for a request an OpenAI server would refuse.
    """
    payload = parse_json(body)
    count = tokens
    for key in ("max_tokens", "max_completion_tokens"):
        limit = payload.get(key)
        if limit is None:
            continue
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise RequestError(400, f"'{key}' must be an integer.", "invalid_max_tokens")
        count = max(0, min(count, limit))
    options = payload.get("stream_options")
    error_after, error_code = error_trigger(payload)
    return Generation(
        kind,
        _input_text(kind, payload),
        count,
        payload.get("stream") is True,
        n=optional_int(payload, "n", 1, _MAX_CHOICES) or 1,
        tools=_called_tools(payload) if kind == "chat" else (),
        logprobs=_asked_logprobs(kind, payload),
        include_usage=isinstance(options, dict) and options.get("include_usage") is True,
        error_after=error_after,
        error_code=error_code,
    )


def _input_text(kind: GenerationKind, payload: dict[str, Any]) -> str:
    if kind == "chat":
        messages = payload.get("messages")
        if not isinstance(messages, list):
            raise RequestError(400, "'messages' must be a list of messages.", "invalid_messages")
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                return content_text(message.get("content"))
        return ""
    prompt = payload.get("prompt", "")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(part, str) for part in prompt):
        return " ".join(prompt)
    raise RequestError(400, "'prompt' must be a string or a list of strings.", "invalid_prompt")


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
        raise RequestError(400, message, "invalid_tools")
    names = tuple(tool["function"]["name"] for tool in tools)
    choice = payload.get("tool_choice")
    if choice == "none":
        return ()
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or name not in names:
            raise RequestError(400, "'tool_choice' names no tool.", "invalid_tool_choice")
        return (name,)
    return names[:1] if payload.get("parallel_tool_calls") is False else names


def _asked_logprobs(kind: GenerationKind, payload: dict[str, Any]) -> int | None:
    if kind == "completion":
        return optional_int(payload, "logprobs", 0, _MAX_COMPLETION_LOGPROBS)
    asked = payload.get("logprobs")
    if asked not in (None, True, False):
        raise RequestError(400, "'logprobs' must be a boolean.", "invalid_logprobs")
    top = optional_int(payload, "top_logprobs", 0, _MAX_TOP_LOGPROBS)
    return (top or 0) if asked else None
