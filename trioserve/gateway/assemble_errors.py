"""The HTTP status and body of an error a stream ends with, as the backend would have answered
the request without streaming; part of ``assemble``. Pure.

Three shapes come in streams: OpenAI's and llama-server's error object ``{"code", "message",
"type"}`` (llama-server's non-streaming status *is* its ``code``), Anthropic's ``{"type":
"error", "error": {"type", "message"}}`` (its status is named by the error's type), and the
Responses API's ``response.failed`` / ``error`` events, whose ``code`` is a string such as
``rate_limit_exceeded``.
"""

from __future__ import annotations

import json
from typing import Final

__all__ = [
    "anthropic_status",
    "error_body",
    "error_status",
    "response_error_status",
]

# OpenAI's and llama-server's error types, for an in-stream error without a numeric code.
_STATUS_BY_TYPE: Final[dict[str, int]] = {
    "invalid_request_error": 400,
    "exceed_context_size_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "rate_limit_error": 429,
    "server_error": 500,
    "not_supported_error": 501,
    "unavailable_error": 503,
    "timeout_error": 504,
}
# Anthropic's error types and the statuses its API answers them with
# (https://docs.anthropic.com/en/api/errors); 529 is its own "overloaded".
_ANTHROPIC_STATUS: Final[dict[str, int]] = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}
# The Responses API's error codes (``response.error.code``, an ``error`` event's ``code``)
# that are not a client's bad input; the others (``invalid_prompt``, ``invalid_image``,
# ``image_too_large``, ...) are.
_RESPONSE_CODE_STATUS: Final[dict[str, int]] = {
    "server_error": 500,
    "rate_limit_exceeded": 429,
    "vector_store_timeout": 504,
}


def error_status(error: object) -> int:
    """The HTTP status for an in-stream error object (the value of its ``"error"`` key)."""
    if isinstance(error, dict):
        status = _numeric(error.get("code"))
        if status is not None:
            return status
        kind = error.get("type")
        if isinstance(kind, str) and kind in _STATUS_BY_TYPE:
            return _STATUS_BY_TYPE[kind]
    return 500


def anthropic_status(error: object) -> int:
    """The status Anthropic answers an error object (``{"type", "message"}``) with."""
    if isinstance(error, dict):
        kind = error.get("type")
        if isinstance(kind, str) and kind in _ANTHROPIC_STATUS:
            return _ANTHROPIC_STATUS[kind]
    return error_status(error)


def response_error_status(code: object) -> int:
    """The status for a Responses API error ``code``: a number, or one of its code names."""
    status = _numeric(code)
    if status is not None:
        return status
    if isinstance(code, str):
        if code in _RESPONSE_CODE_STATUS:
            return _RESPONSE_CODE_STATUS[code]
        if code in _STATUS_BY_TYPE:
            return _STATUS_BY_TYPE[code]
        if code.startswith(("invalid_", "image_")) or "_image" in code:
            return 400
    return 500


def error_body(status: int, message: object, kind: object) -> bytes:
    """An error answer in llama-server's non-streaming shape, ``{"error": {"code", "message",
    "type"}}``."""
    error = {
        "code": status,
        "message": message if isinstance(message, str) else "the model server failed",
        "type": kind if isinstance(kind, str) and kind else "server_error",
    }
    return json.dumps({"error": error}, separators=(",", ":")).encode()


def _numeric(code: object) -> int | None:
    if isinstance(code, str) and code.isascii() and code.isdigit():
        code = int(code)
    if isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599:
        return code
    return None
