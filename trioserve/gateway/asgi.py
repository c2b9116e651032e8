"""Small ASGI helpers for the hot path, where every Python layer per chunk costs throughput."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from trioserve.errors import TrioserveError

__all__ = [
    "Message",
    "Receive",
    "Scope",
    "Send",
    "bearer_ok",
    "header",
    "key_matches",
    "presented_key",
    "send_error",
    "send_json",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def presented_key(scope: Scope) -> bytes | None:
    """The key a request presents: ``Authorization: Bearer KEY``, else ``x-api-key: KEY``
    (Anthropic's clients send that one), on every path."""
    auth = header(scope, b"authorization")
    if auth:
        scheme, _, token = auth.partition(b" ")
        token = token.strip()
        if scheme.lower() == b"bearer" and token:
            return token
    return header(scope, b"x-api-key") or None


def key_matches(key: bytes | None, keys: Iterable[str]) -> bool:
    """True when ``key`` is one of ``keys`` (constant time; False for no key)."""
    if not key:
        return False
    # Compare against every key, without stopping at the first match, so timing says nothing
    # about which key (or how much of one) matched.
    matched = False
    for candidate in keys:
        matched |= hmac.compare_digest(key, candidate.encode())
    return matched


def bearer_ok(scope: Scope, keys: Iterable[str]) -> bool:
    """True when no keys are configured, or the presented key matches one (constant time)."""
    keys = list(keys)
    return not keys or key_matches(presented_key(scope), keys)


async def send_json(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    all_headers = [(b"content-type", b"application/json"), *(headers or [])]
    all_headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_error(send: Send, error: TrioserveError) -> None:
    body = error.body_bytes()
    headers = [h for h in error.headers() if h[0] != b"content-type"]
    await send_json(send, error.status, body, headers)
