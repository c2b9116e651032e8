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


def bearer_ok(scope: Scope, keys: Iterable[str]) -> bool:
    """True when no keys are configured, or the bearer token matches one (constant time)."""
    keys = list(keys)
    if not keys:
        return True
    auth = header(scope, b"authorization") or b""
    scheme, _, token = auth.partition(b" ")
    if scheme.lower() != b"bearer" or not token:
        return False
    token = token.strip()
    # Compare against every key, without stopping at the first match, so timing says nothing
    # about which key (or how much of one) matched.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(token, key.encode())
    return matched


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
