"""What every API's request parsing shares: the JSON body, bounded integers, and the refusal
(``RequestError``) that the app turns into an OpenAI-shaped error answer. Pure: no I/O."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["RequestError", "error_body", "optional_int", "parse_json"]


def error_body(message: str, code: str, kind: str = "invalid_request_error") -> bytes:
    """OpenAI's error shape, which clients parse to show ``message``."""
    return json.dumps({"error": {"message": message, "type": kind, "code": code}}).encode()


class RequestError(Exception):
    """A request the server refuses; becomes an OpenAI-shaped error answer."""

    def __init__(
        self, status: int, message: str, code: str, kind: str = "invalid_request_error"
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(message, code, kind)


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
