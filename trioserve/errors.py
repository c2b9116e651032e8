"""The exceptions of trioserve, each carrying the HTTP status and OpenAI error code it maps to.

The mapping to HTTP lives here, in one place: the gateway turns any ``TrioserveError`` into
``{"error": {"message", "type", "code"}}`` with ``status`` and, where set, ``Retry-After``; on
Anthropic's paths into ``{"type": "error", "error": {"type", "message"}}`` (``anthropic_body``),
the shape Anthropic's SDK reads, with the same status.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable

__all__ = [
    "ConfigError",
    "InvalidApiKey",
    "InvalidRequest",
    "ModelNotFound",
    "ModelUnavailable",
    "QueueFull",
    "RateLimited",
    "RequestTimeout",
    "RequestTooLarge",
    "TrioserveError",
    "UpstreamError",
]


class TrioserveError(Exception):
    """Base class: an error a client or an operator can act on."""

    status: int = 500
    code: str = "internal_error"
    type: str = "server_error"

    def __init__(
        self, message: str, *, retry_after: float | None = None, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        if status is not None:
            self.status = status

    def body(self) -> dict[str, dict[str, str]]:
        """The OpenAI-shaped error object."""
        return {"error": {"message": self.message, "type": self.type, "code": self.code}}

    def body_bytes(self) -> bytes:
        return json.dumps(self.body()).encode()

    def anthropic_body(self) -> bytes:
        """The error in Anthropic's shape: its type named after our status."""
        kind = _ANTHROPIC_TYPES.get(self.status, "api_error")
        return json.dumps(
            {"type": "error", "error": {"type": kind, "message": self.message}}
        ).encode()

    def headers(self) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", b"application/json")]
        if self.retry_after is not None:
            # Retry-After takes whole seconds; round up so a client never retries too early.
            seconds = max(1, math.ceil(self.retry_after))
            headers.append((b"retry-after", str(seconds).encode()))
        return headers


# Anthropic's error types by status (its API reference, "Errors"); 502 and 504 are api_error.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


class InvalidRequest(TrioserveError):
    status, code, type = 400, "invalid_request", "invalid_request_error"


class InvalidApiKey(TrioserveError):
    status, code, type = 401, "invalid_api_key", "authentication_error"

    def __init__(self, reason: str = "a valid API key is required") -> None:
        super().__init__(f"{reason}: send it as 'Authorization: Bearer KEY' (or 'x-api-key: KEY')")


NAME_SHOWN = 100


class ModelNotFound(TrioserveError):
    status, code, type = 404, "model_not_found", "invalid_request_error"

    def __init__(self, name: str, known: Iterable[str]) -> None:
        names = ", ".join(sorted(known)) or "(none configured)"
        # A client's 4 MB "model" string is not echoed back whole.
        shown = name if len(name) <= NAME_SHOWN else name[:NAME_SHOWN] + "…"
        super().__init__(f"model {shown!r} does not exist; known models: {names}")
        self.name = name


class RequestTooLarge(TrioserveError):
    status, code, type = 413, "request_too_large", "invalid_request_error"

    def __init__(self, limit: int, setting: str = "max_body_bytes") -> None:
        super().__init__(f"request body is larger than {setting} ({limit} bytes)")


class QueueFull(TrioserveError):
    status, code, type = 429, "queue_full", "rate_limit_error"

    def __init__(self, model: str, max_queue: int) -> None:
        super().__init__(
            f"model {model!r} is busy: {max_queue} requests are already waiting; retry later",
            retry_after=1,
        )


# What each budget counts, for the message of a refusal.
_BUDGET_WINDOWS = {
    "max_requests_per_minute": "requests in the last 60 s",
    "max_tokens_per_minute": "tokens in the last 60 s",
    "max_tokens_per_day": "tokens today (UTC)",
}


class RateLimited(TrioserveError):
    """A user over one of its budgets; ``Retry-After`` is when that budget has room again."""

    status, code, type = 429, "rate_limited", "rate_limit_error"

    def __init__(self, user: str, budget: str, limit: int, used: int, retry_after: float) -> None:
        what = _BUDGET_WINDOWS.get(budget, "used")
        super().__init__(
            f"user {user!r} is over its budget {budget} = {limit} ({used} {what}); "
            f"retry in {max(1, math.ceil(retry_after))} s",
            retry_after=retry_after,
        )
        self.budget = budget


class UpstreamError(TrioserveError):
    status, code, type = 502, "upstream_error", "server_error"


class ModelUnavailable(TrioserveError):
    status, code, type = 503, "model_unavailable", "server_error"


class RequestTimeout(TrioserveError):
    status, code, type = 504, "timeout", "timeout_error"


class ConfigError(Exception):
    """An invalid config file: names the file, the key path and the reason."""

    def __init__(self, path: str, key: str, reason: str) -> None:
        where = f"{path}: {key}: " if key else f"{path}: "
        super().__init__(where + reason)
        self.path = path
        self.key = key
        self.reason = reason
