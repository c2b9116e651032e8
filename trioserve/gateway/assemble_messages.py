"""An Anthropic Messages answer (``/v1/messages``) from its stream; part of ``assemble``, whose
``Assembler`` feeds it every event. Pure.

The message is built as the ``anthropic`` SDK accumulates it (``messages.stream(...)
.get_final_message()``): ``message_start`` gives the message (id, model, the usage's input
part), ``content_block_start`` / ``_delta`` build the content blocks (text, a tool call's JSON
input, thinking and its signature, citations), ``message_delta`` sets the stop reason and
merges its usage (cumulative counts: a count it sends replaces the one before), and
``message_stop`` ends it. Keys keep the order the stream gave them, which is also the order of
llama-server's and Anthropic's non-streaming answers.

An ``error`` event ends it: Anthropic's ``{"type": "error", "error": {...}}`` is its
non-streaming error body too, with the status its type names; llama-server writes the bare
error object ``{"code", "message", "type"}``, whose non-streaming body is ``{"error": ...}``.
"""

from __future__ import annotations

import json
from typing import Any, Final

from trioserve.gateway.assemble_errors import anthropic_status, error_status

__all__ = ["MessagesAnswer"]

# Content blocks whose input arrives as ``input_json_delta`` pieces.
_TOOL_BLOCKS: Final = frozenset({"tool_use", "server_tool_use", "mcp_tool_use"})
# The text-like deltas: the block field each one appends to.
_TEXT_FIELDS: Final[dict[str, str]] = {"text_delta": "text", "thinking_delta": "thinking"}
# message_delta's delta fields set even when null, as the SDK does; others only when not.
_ALWAYS_SET: Final = frozenset({"stop_reason", "stop_sequence"})


class MessagesAnswer:
    """A Messages stream as taken so far."""

    __slots__ = ("_blocks", "_message", "_usage", "done", "error", "final", "tokens")

    def __init__(self) -> None:
        self._message: dict[str, Any] | None = None
        self._usage: dict[str, Any] = {}
        self._blocks: dict[int, _Block] = {}
        self.done = False
        self.final = False  # a message_delta's usage came: the counts are the answer's
        self.error: tuple[int, bytes] | None = None
        self.tokens = 0  # content_block_delta events: a token each

    @property
    def usage(self) -> Any:
        """The message's usage, once the stream reported its output tokens; else None."""
        return self._usage if self.final else None

    @property
    def prompt_usage(self) -> dict[str, Any]:
        """The usage ``message_start`` reported (its input tokens), merged with the
        ``message_delta`` ones after it: the input tokens are known before the end."""
        return self._usage

    def take(self, name: str | None, event: dict[str, Any], data: bytes) -> None:
        """One event (``name`` from its ``event:`` line, if any; ``data`` its JSON). Raises
        ``KeyError``, ``TypeError`` or ``AttributeError`` on an event that is not the API's
        shape, or comes out of order."""
        kind = event.get("type", name)
        if kind == "content_block_delta":  # most events
            self.tokens += 1
            self._blocks[event["index"]].add(event["delta"])
        elif name == "error" or kind == "error" or (kind is None and "error" in event):
            self.error = _error_event(event, data)
            self.done = True
        elif kind == "message_start":
            message = event["message"]
            if not isinstance(message, dict):
                raise TypeError(f"message_start's message is {type(message).__name__}")
            self._message = dict(message)
            usage = message.get("usage")
            self._usage = dict(usage) if isinstance(usage, dict) else {}
        elif kind == "content_block_start":
            index = event["index"]
            if self._message is None:
                raise TypeError("content_block_start before message_start")
            if index.__class__ is not int:
                raise TypeError(f"content_block_start's index is {index!r}")
            self._blocks[index] = _Block(event["content_block"])
        elif kind == "message_delta":
            message = self._message
            if message is None:
                raise TypeError("message_delta before message_start")
            for key, value in (event.get("delta") or {}).items():
                if value is not None or key in _ALWAYS_SET:
                    message[key] = value
            usage = event.get("usage")
            if isinstance(usage, dict):
                self._usage.update((k, v) for k, v in usage.items() if v is not None)
                self.final = True
        elif kind == "message_stop":
            if self._message is None:
                raise TypeError("message_stop before message_start")
            self.done = True
        # ping, content_block_stop, and events this version does not know: nothing to keep.

    def answer(self) -> dict[str, Any]:
        """The message; once ``done`` without ``error``."""
        assert self._message is not None
        message = dict(self._message)
        message["content"] = [self._blocks[i].to_json() for i in sorted(self._blocks)]
        if "usage" in message or self._usage:
            message["usage"] = self._usage
        return message


class _Block:
    __slots__ = ("block", "json", "parts")

    def __init__(self, start: dict[str, Any]) -> None:
        if not isinstance(start, dict):
            raise TypeError(f"a content block is {type(start).__name__}")
        self.block = dict(start)
        self.parts: dict[str, list[str]] = {}  # text or thinking pieces, joined once
        self.json: list[str] = []  # a tool call's input, in pieces

    def add(self, delta: dict[str, Any]) -> None:
        kind = delta["type"]
        field = _TEXT_FIELDS.get(kind)
        if field is not None:
            piece = delta[field]
            if piece.__class__ is not str:
                raise TypeError(f"{kind} is {type(piece).__name__}")
            parts = self.parts.get(field)
            if parts is None:
                parts = self.parts[field] = []
            parts.append(piece)
        elif kind == "input_json_delta":
            piece = delta["partial_json"]
            if piece.__class__ is not str:
                raise TypeError(f"partial_json is {type(piece).__name__}")
            self.json.append(piece)
        elif kind == "signature_delta":
            self.block["signature"] = delta["signature"]  # the last one, as the SDK keeps
        elif kind == "citations_delta":
            citations = self.block.get("citations")
            if isinstance(citations, list):
                citations.append(delta["citation"])
            else:
                self.block["citations"] = [delta["citation"]]
        # Delta types this version does not know are left out, as the SDK leaves them.

    def to_json(self) -> dict[str, Any]:
        block = dict(self.block)
        for field, parts in self.parts.items():
            start = block.get(field)
            block[field] = (start if isinstance(start, str) else "") + "".join(parts)
        if self.json:
            try:
                block["input"] = json.loads("".join(self.json))
            except ValueError:
                # What llama-server's non-streaming answer holds for the same generation
                # (a tool call whose arguments are not JSON); the SDK would raise.
                block["input"] = {}
        elif block.get("type") in _TOOL_BLOCKS and "input" not in block:
            block["input"] = {}  # llama-server starts a tool_use block without it
        return block


def _error_event(event: dict[str, Any], data: bytes) -> tuple[int, bytes]:
    inner = event.get("error")
    if isinstance(inner, dict):
        if event.get("type") == "error":
            # Anthropic's: the body its non-streaming answer has, the status its type names.
            return anthropic_status(inner), bytes(data)
        return error_status(inner), bytes(data)
    # llama-server's: `event: error` with the bare error object.
    status = error_status(event)
    return status, json.dumps({"error": event}, separators=(",", ":")).encode()
