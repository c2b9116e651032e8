"""What every API's request parsing shares: the JSON body, bounded integers, the test triggers,
and the refusal (``RequestError``) that the app turns into an error answer. Pure: no I/O."""

from __future__ import annotations

import json
from typing import Any, Final

__all__ = [
    "RequestError",
    "error_body",
    "error_trigger",
    "optional_int",
    "parse_json",
    "token_limit",
]

# Bounds of ``echo_error_after`` (a token count: far beyond any reply) and ``echo_error_code``.
_MAX_ERROR_AFTER: Final = 1 << 30


def error_body(message: str, code: str, kind: str = "invalid_request_error") -> bytes:
    """OpenAI's error shape, which clients parse to show ``message``."""
    return json.dumps({"error": {"message": message, "type": kind, "code": code}}).encode()


class RequestError(Exception):
    """A request the server refuses. The chat, completions and embeddings APIs answer it in
    OpenAI's shape (``body``); the APIs llama-server added later in its own (``llama_body``)."""

    def __init__(
        self, status: int, message: str, code: str, kind: str = "invalid_request_error"
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.body = error_body(message, code, kind)

    @property
    def llama_body(self) -> bytes:
        """llama-server's shape: ``{"error": {"code": STATUS, "message", "type"}}``."""
        error = {"code": self.status, "message": self.message, "type": self.kind}
        return json.dumps({"error": error}, separators=(",", ":")).encode()


def parse_json(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 ``RequestError``."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RequestError(
            400, f"The request body is not valid JSON: {error}", "invalid_json"
        ) from error
    if not isinstance(payload, dict):
        raise RequestError(400, "The request body must be a JSON object.", "invalid_json")
    return payload


def optional_int(payload: dict[str, Any], key: str, low: int, high: int) -> int | None:
    """``payload[key]``, an integer from ``low`` to ``high``, or None if absent or null."""
    value = payload.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        message = f"'{key}' must be an integer from {low} to {high}."
        raise RequestError(400, message, f"invalid_{key}")
    return value


def token_limit(payload: dict[str, Any], key: str, tokens: int) -> tuple[int, bool]:
    """The reply's length: ``tokens`` (the echo's ``--tokens``) unless ``payload[key]`` is less;
    and whether that limit cut the reply (a negative limit is none, as llama-server's -1)."""
    limit = payload.get(key)
    if limit is None:
        return tokens, False
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise RequestError(400, f"'{key}' must be an integer.", f"invalid_{key}")
    if limit < 0 or limit >= tokens:
        return tokens, False
    return limit, True


def error_trigger(payload: dict[str, Any]) -> tuple[int | None, int]:
    """The test trigger ``echo_error_after`` (None: absent) and ``echo_error_code`` (default
    500): see ``generation``'s docstring."""
    after = optional_int(payload, "echo_error_after", 0, _MAX_ERROR_AFTER)
    code = optional_int(payload, "echo_error_code", 400, 599) or 500
    return after, code
