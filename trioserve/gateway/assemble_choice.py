"""One choice of an assembled answer, merged chunk by chunk (``MergedChoice``); part of
``assemble``, whose ``Assembler`` keeps one per choice index and feeds it every chunk's choice.

Pure, and on the hot path of ``assemble``: every chunk's choice passes through
``MergedChoice.merge``, so text is appended to lists and joined once, in ``to_json``.
"""

from __future__ import annotations

from typing import Any, Final

__all__ = ["MergedChoice"]

# A choice's fields that are merged field by field; any other is copied (the last value).
_CHOICE_FIELDS: Final = frozenset({"index", "delta", "text", "finish_reason", "logprobs"})


class MergedChoice:
    """One choice as merged so far."""

    __slots__ = (
        "content",
        "fields",
        "finish_reason",
        "has_logprobs",
        "index",
        "logprobs",
        "message",
        "other",
        "role",
        "tool_calls",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.role: str | None = None
        # String fields of a delta (content, reasoning_content, refusal; a completion's text):
        # their pieces, joined once at the end. A null piece is not kept, but its key is.
        self.content: list[str] = []
        self.fields: dict[str, list[str]] = {"content": self.content}
        # Other fields, of the delta (the message's) and of the choice: the last value.
        self.message: dict[str, Any] = {}
        self.other: dict[str, Any] = {}
        self.tool_calls: dict[int, _ToolCall] = {}
        self.logprobs: Any = None
        self.has_logprobs = False  # the answer has the key when the chunks had it
        self.finish_reason: Any = None

    def merge(self, choice: dict[str, Any]) -> None:
        """Merge one chunk's choice of this index. Raises ``TypeError`` (or ``KeyError``,
        ``AttributeError``) on a choice that is not OpenAI's shape."""
        delta = choice.get("delta")
        if delta:
            content = delta.get("content")
            if len(delta) == 1 and content.__class__ is str:  # most chunks: one token of text
                self.content.append(content)
            else:
                self._merge_delta(delta)
        text = choice.get("text")  # a completion's
        if text is not None:
            _append(self.fields, "text", text)
        finish_reason = choice.get("finish_reason")
        if finish_reason is not None:
            self.finish_reason = finish_reason
        if "logprobs" in choice:
            self.logprobs = _merge_logprobs(self.logprobs, choice["logprobs"])
            self.has_logprobs = True
        if choice.keys() <= _CHOICE_FIELDS:
            return
        other = self.other
        for key, value in choice.items():
            if key not in _CHOICE_FIELDS and (value is not None or key not in other):
                other[key] = value

    def _merge_delta(self, delta: dict[str, Any]) -> None:
        for key, value in delta.items():
            if key == "tool_calls":
                for call in value or ():
                    index = call["index"]
                    merged = self.tool_calls.get(index)
                    if merged is None:
                        merged = self.tool_calls[index] = _ToolCall()
                    merged.merge(call)
            elif key == "role":
                if self.role is None:
                    self.role = value
            elif isinstance(value, str) or value is None:
                _append(self.fields, key, value)
            else:
                self.message[key] = value

    def to_json(self, *, chat: bool) -> dict[str, Any]:
        """The choice of the answer: a chat ``message``, or a completion's ``text``."""
        choice: dict[str, Any] = {"index": self.index}
        if chat:
            message: dict[str, Any] = {
                "role": self.role or "assistant",
                "content": "".join(self.content) if self.content or not self.tool_calls else None,
            }
            for key, parts in self.fields.items():
                if key != "content":
                    message[key] = "".join(parts) if parts else None
            message.update(self.message)
            if self.tool_calls:
                message["tool_calls"] = [
                    self.tool_calls[i].to_json() for i in sorted(self.tool_calls)
                ]
            choice["message"] = message
        else:
            choice["text"] = "".join(self.fields.get("text", ()))
        if self.has_logprobs:
            choice["logprobs"] = self.logprobs
        choice["finish_reason"] = self.finish_reason
        for key, value in self.other.items():
            choice.setdefault(key, value)
        return choice


class _ToolCall:
    __slots__ = ("arguments", "function", "other")

    def __init__(self) -> None:
        self.arguments: list[str] = []
        # id and type (of the call), name (of its function): the first value seen, as OpenAI
        # sends them once, in the call's first chunk.
        self.other: dict[str, Any] = {}
        self.function: dict[str, Any] = {}

    def merge(self, delta: dict[str, Any]) -> None:
        for key, value in delta.items():
            if key == "function":
                if value is None:
                    continue
                for name, part in value.items():
                    if name == "arguments":
                        if part:
                            self.arguments.append(part)
                    elif part is not None and self.function.get(name) is None:
                        self.function[name] = part
            elif key != "index" and value is not None and self.other.get(key) is None:
                self.other[key] = value

    def to_json(self) -> dict[str, Any]:
        call = {"id": self.other.get("id"), "type": self.other.get("type", "function")}
        call.update((k, v) for k, v in self.other.items() if k not in call)
        call["function"] = {
            "name": self.function.get("name"),
            **{k: v for k, v in self.function.items() if k != "name"},
            "arguments": "".join(self.arguments),
        }
        return call


def _merge_logprobs(merged: Any, new: Any) -> Any:
    """Lists (chat ``content``/``refusal``, a completion's ``tokens``, ``token_logprobs``,
    ``top_logprobs``, ``text_offset``) are concatenated; anything else, the last not None."""
    if new is None:
        return merged
    if not isinstance(merged, dict) or not isinstance(new, dict):
        return new
    for key, value in new.items():
        old = merged.get(key)
        if isinstance(old, list) and isinstance(value, list):
            old.extend(value)
        elif value is not None or key not in merged:
            merged[key] = list(value) if isinstance(value, list) else value
    return merged


def _append(fields: dict[str, list[str]], key: str, value: str | None) -> None:
    parts = fields.get(key)
    if parts is None:
        parts = fields[key] = []
    if isinstance(value, str):
        if value:
            parts.append(value)
    elif value is not None:
        raise TypeError(f"{key} is {type(value).__name__}")
