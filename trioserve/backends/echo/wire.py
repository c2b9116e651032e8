"""Bytes and texts every API's answers share: compact JSON, server-sent events, llama-server's
error object, the text of a message's content, word counts. Pure: no I/O."""

from __future__ import annotations

import json
from typing import Any, Final

__all__ = [
    "ERROR_TYPES",
    "content_text",
    "data_event",
    "dumps",
    "llama_error",
    "named_event",
    "timings",
    "words",
]

# Error types of llama-server's error objects, by status (``echo_error_code``).
ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    501: "not_supported_error",
    503: "unavailable_error",
}


def dumps(value: Any) -> bytes:
    """JSON without spaces, as llama-server writes it."""
    return json.dumps(value, separators=(",", ":")).encode()


def data_event(value: Any) -> bytes:
    """An event with a ``data:`` line only (OpenAI's chat and completions, llama.cpp's own)."""
    return b"data: " + dumps(value) + b"\n\n"


def named_event(name: str, value: Any) -> bytes:
    """An event with an ``event:`` line, as the Responses and Messages streams send each."""
    return b"event: " + name.encode() + b"\ndata: " + dumps(value) + b"\n\n"


def llama_error(code: int, message: str) -> dict[str, Any]:
    """llama-server's error object, the value of ``"error"`` in its answers."""
    return {"code": code, "message": message, "type": ERROR_TYPES.get(code, "server_error")}


def content_text(content: object) -> str:
    """The text of a message's content: a string, or parts such as OpenAI's
    ``{"type": "text"|"input_text", "text"}`` and Anthropic's text blocks, joined by spaces."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def words(*texts: str) -> int:
    """How many tokens the echo's model counts in ``texts``: their words, as for every usage."""
    return sum(len(text.split()) for text in texts)


def timings(prompt_n: int, predicted_n: int, token_delay: float) -> dict[str, float | int]:
    """llama-server's ``timings``: the echo reads its prompt in no time, and takes
    ``token_delay`` seconds a token (a rate of 0 stands for infinite, which JSON cannot say)."""
    predicted_ms = predicted_n * token_delay * 1000
    return {
        "cache_n": 0,
        "prompt_n": prompt_n,
        "prompt_ms": 0.0,
        "prompt_per_token_ms": 0.0,
        "prompt_per_second": 0.0,
        "predicted_n": predicted_n,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": predicted_ms / predicted_n if predicted_n else 0.0,
        "predicted_per_second": 1000 * predicted_n / predicted_ms if predicted_ms else 0.0,
    }
