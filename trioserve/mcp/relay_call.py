"""A model call made through the relay in this process: the same path as ``/v1`` (identity,
budgets, fair share, deadlines, usage, loading progress, a model started on demand).

The relay gets a synthetic ASGI scope with the caller's ``User`` in ``scope["state"]``
(``IN_PROCESS_USER_KEY``). A chat is sent with ``"stream": true`` so that the relay's progress
comments (``: loading model X (2.1s)``, ``: waiting for model X``) arrive while it waits and
each chunk while it generates; the ``Assembler`` makes the answer of the stream. The call runs
in the tool's task: cancelling the tool cancels the relay, which closes the upstream request.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from trioserve.errors import TrioserveError
from trioserve.gateway.asgi import Message
from trioserve.gateway.assemble import Assembler
from trioserve.gateway.relay import IN_PROCESS_USER_KEY, Relay
from trioserve.mcp.context import Caller

__all__ = ["Progress", "RelayAnswer", "call_relay"]

# Progress while generating: at most this often (each chunk would flood a slow client).
PROGRESS_EVERY = 0.2
# Progress at least this often, whatever the relay says (``_Collector.heartbeat``).
HEARTBEAT = 1.0
# While a call waits (its model starts, its slot is busy), each progress message adds this
# much: the value must increase, and stays below the first generated token (1).
WAITING_STEP = 0.001

Progress = Callable[[float, float | None, str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class RelayAnswer:
    status: int
    body: dict[str, Any]  # the answer, or {"error": {...}}

    @property
    def error(self) -> str | None:
        """The error's message a person can act on, or None for an answer."""
        if self.status < 400 and "error" not in self.body:
            return None
        error = self.body.get("error")
        message = error.get("message") if isinstance(error, dict) else error
        return str(message or f"the model call failed with status {self.status}")


def _generated(event: bytes) -> int:
    """1 for a stream event that carries generated text, else 0: the role-only first event,
    the finish_reason one and the usage one carry none (llama-server, vLLM, OpenAI)."""
    try:
        data = json.loads(event)
    except ValueError:
        return 0
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list):
        return 0
    for choice in choices:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict) and (
            delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls")
        ):
            return 1
    return 0


class _Collector:
    """The relay's ``send``: the status, progress from comments and chunks, the body."""

    def __init__(self, progress: Progress | None, total: float | None, model: str) -> None:
        self.progress = progress
        self.total = total
        self.model = model
        self.status = 0
        self.content_type = b""
        self.assembler: Assembler | None = None
        self.parts: list[bytes] = []
        self._tail = b""
        self._chunks = 0
        self._last_progress = -math.inf
        self._waited = 0
        self._sent = 0.0
        self._waiting: str | None = None  # the relay's last waiting message
        # Set once the call was cancelled: what the relay sends after that is not progress.
        self.gone: trio.Event | None = None

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            for key, value in message.get("headers", []):
                if key.lower() == b"content-type":
                    self.content_type = bytes(value)
            if self.status == 200 and self.content_type.startswith(b"text/event-stream"):
                self.assembler = Assembler("chat")
            return
        body = bytes(message.get("body", b""))
        if self.assembler is None:
            self.parts.append(body)
            return
        self.assembler.feed(body)
        await self._report(body)

    async def _report(self, body: bytes) -> None:
        if self.progress is None or (self.gone is not None and self.gone.is_set()):
            return  # cancelled: the relay's last words are not progress
        lines = (self._tail + body).split(b"\n")
        self._tail = lines.pop()
        message: str | None = None
        for line in lines:
            if line.startswith(b": "):
                # The relay's own words while the request waits: forwarded as they are.
                message = line[2:].decode("utf-8", "replace").strip()
            elif line.startswith(b"data: {"):
                self._chunks += _generated(line[6:])
        now = trio.current_time()
        if message is not None:
            self._last_progress = now
            self._waiting = message
            # Progress must increase with each notification (MCP): while nothing is generated
            # yet, each waiting message moves it by a sliver below the first token.
            self._waited += 1
            await self._send(min(self._waited * WAITING_STEP, 1 - WAITING_STEP), message)
        elif self._chunks and now - self._last_progress >= PROGRESS_EVERY:
            self._last_progress = now
            await self._send(self._chunks, f"{self._chunks} tokens from {self.model}")

    async def heartbeat(self) -> None:
        """At least one notification a second (the issue's promise to a waiting agent), also
        while a model is prefilling or generates slower than a token a second, and when the
        relay says nothing while waiting (``loading_progress = false``)."""
        if self.progress is None:
            return
        # The first second is counted from the call's start.
        self._last_progress = max(self._last_progress, trio.current_time())
        while True:
            await trio.sleep_until(self._last_progress + HEARTBEAT)
            now = trio.current_time()
            if now - self._last_progress < HEARTBEAT:
                continue  # something was sent meanwhile
            if self.gone is not None and self.gone.is_set():
                return
            self._last_progress = now
            message = (
                f"{self._chunks} tokens from {self.model}"
                if self._chunks
                else self._waiting or f"waiting for model {self.model}"
            )
            # The same figure as before, a sliver more: the value must rise every time (never
            # past the total: then there is nothing left to report).
            value = max(self._chunks, self._sent + WAITING_STEP)
            if self.total is not None:
                value = min(value, self.total)
            await self._send(value, message)

    async def _send(self, value: float, message: str) -> None:
        assert self.progress is not None
        if value <= self._sent:
            return  # never a step back (a waiting message after the first token)
        self._sent = value
        await self.progress(value, self.total, message)

    def answer(self) -> RelayAnswer:
        if self.assembler is not None:
            try:
                assembled = self.assembler.result()
            except TrioserveError as exc:  # a stream cut short
                return RelayAnswer(exc.status, exc.body())
            status, raw = assembled.status, assembled.body
        else:
            status, raw = self.status, b"".join(self.parts)
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {"error": {"message": raw.decode("utf-8", "replace")[:500]}}
        if not isinstance(body, dict):
            body = {"error": {"message": f"unexpected answer: {str(body)[:200]}"}}
        return RelayAnswer(status, body)


async def call_relay(
    relay: Relay,
    caller: Caller,
    path: str,
    payload: dict[str, Any],
    *,
    progress: Progress | None = None,
    total: float | None = None,
) -> RelayAnswer:
    """``payload`` POSTed to ``path`` through ``relay`` as ``caller``."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *caller.headers,
        ],
        "client": caller.client,
        "server": None,
        "state": {IN_PROCESS_USER_KEY: caller.user},
    }
    sent = False
    # Set when the tool's task is cancelled: the relay then sees what it sees when an HTTP
    # client hangs up (``http.disconnect``) and takes the very same path: upstream aborted at
    # once, the cut-short answer counted, trioserve_upstream_cancellations_total.
    gone = trio.Event()

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    collector = _Collector(progress, total, str(payload.get("model", "")))
    collector.gone = gone
    relayed = trio.Event()

    async def hang_up_when_cancelled() -> None:
        try:
            await relayed.wait()
        finally:
            gone.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hang_up_when_cancelled)
        nursery.start_soon(collector.heartbeat)
        # Shielded: a cancel reaches the relay as its client's hang-up (above), not as a
        # Cancelled in the middle of its bookkeeping. Bounded all the same: the hang-up ends
        # it at once, and its own deadlines hold.
        with trio.CancelScope(shield=True):
            await relay(scope, receive, collector.send)
        relayed.set()
        nursery.cancel_scope.cancel()  # the heartbeat: the answer is complete
    return collector.answer()
