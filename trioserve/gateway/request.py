"""One client request as the relay sees it: its state, its body read and parsed, its client
watched for a disconnect."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import trio

from trioserve.errors import InvalidRequest, RequestTooLarge
from trioserve.gateway.apis import Api
from trioserve.gateway.asgi import Receive, Scope, header
from trioserve.gateway.assemble import Kind
from trioserve.gateway.downstream import Downstream, Headers
from trioserve.sharing.identity import ANONYMOUS, User

__all__ = ["ClientGone", "RelayedRequest", "parse_body", "read_body"]


class ClientGone(Exception):
    """The client disconnected: nobody is left to answer."""


@dataclass(slots=True)
class RelayedRequest:
    """What one request knows about itself."""

    scope: Scope
    out: Downstream
    api: Api
    model: str = ""
    # The path and query asked of the model server (``/upstream`` strips its prefix).
    target: str = ""
    streaming: bool = False
    user: User = ANONYMOUS
    # Set when a non-streaming request goes upstream as a stream, to be assembled back.
    assemble: Kind | None = None
    # (prompt, completion) tokens, from the upstream's usage when the answer carried one.
    usage: tuple[int, int] | None = None
    start_clock: float = field(default_factory=trio.current_time)
    client_gone: bool = False
    # Set at the first upstream byte, or when the upstream side is done: progress comments end.
    answering: trio.Event = field(default_factory=trio.Event)
    # A whole answer (non-streaming): sent after the upstream side is done, in two sends,
    # outside the scope the client's disconnect cancels.
    reply: tuple[int, Headers, bytes] | None = None
    # Set once the client's body has been read to its end: until then an upload's body is
    # still coming from ``receive``, and it is the upload that sees a disconnect.
    body_read: trio.Event = field(default_factory=trio.Event)
    # An upload's ``receive``, whose rest may still be unread when the request fails.
    unread: Receive | None = None

    async def watch_disconnect(self, receive: Receive, scope: trio.CancelScope) -> None:
        """Cancel ``scope`` (everything this request does upstream) once the client goes."""
        if not self.body_read.is_set():
            await self.body_read.wait()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.client_gone = True
                scope.cancel()
                return


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole request body; 400 for two framings, 413 beyond ``limit``."""
    declared = header(scope, b"content-length")
    if declared is not None and header(scope, b"transfer-encoding") is not None:
        # Two framings at once is how requests are smuggled past proxies that disagree on
        # which one wins (RFC 9112 6.3): refused, not guessed.
        raise InvalidRequest("both Content-Length and Transfer-Encoding are set")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        # Refused before reading: a client cannot make us buffer more than the limit.
        raise RequestTooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def parse_body(body: bytes) -> tuple[dict[str, Any], str]:
    """The JSON object and its ``model``; 400 when either is missing or of the wrong kind."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise InvalidRequest("body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidRequest("body must be a JSON object")
    model = data.get("model")
    if not isinstance(model, str):
        raise InvalidRequest("'model' is required and must be a string")
    return data, model
