"""The relay: one client request → admission → a lease on a ready model → upstream → client.

Written against raw ASGI rather than through Quart: this is the per-chunk hot path, and each
framework layer a chunk passes through costs throughput and event-loop time that ``/health``
and every other stream then wait for. One upstream read becomes one ``send`` to the client.

Deadlines are cancel scopes at the call site: ``request_timeout`` around everything,
``first_byte_timeout`` around queue + start + first upstream byte, ``stream_idle_timeout``
around each upstream read. Leaving any of them closes the upstream response, which closes its
connection, so the backend sees the disconnect and stops generating.
"""

from __future__ import annotations

import contextlib
import json
import logging
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

from .asgi import Receive, Scope, Send, header, send_error
from .config import Config
from .errors import (
    InvalidRequest,
    RequestTimeout,
    RequestTooLarge,
    TrioserveError,
    UpstreamError,
)
from .lifecycle import State
from .metrics import Metrics
from .supervisor import Supervisor

__all__ = ["Relay", "RelayPaths"]

log = logging.getLogger(__name__)

RelayPaths = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})

_SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    # Tell nginx and friends not to buffer the stream.
    (b"x-accel-buffering", b"no"),
]
# A client that trickles its body (slowloris) is cut off after this long.
BODY_READ_TIMEOUT = 30.0
# After this long without a ready model, a streaming client starts getting progress comments.
PROGRESS_AFTER = 1.0
PROGRESS_EVERY = 1.0
# Copied from the upstream response; hop-by-hop and length headers are ours to set.
_PASSED_HEADERS = frozenset({b"content-type", b"cache-control", b"x-request-id"})


class _ClientGone(Exception):
    pass


@dataclass
class _Exchange:
    """What one request has done so far; decides how an error can still be reported."""

    scope: Scope
    send: Send
    model: str = ""
    started: bool = False  # the response start was sent
    streaming: bool = False
    status: int = 0
    start_clock: float = field(default_factory=trio.current_time)
    first_byte_at: float | None = None
    client_gone: bool = False
    send_lock: trio.Lock = field(default_factory=trio.Lock)


class _Pump:
    """Reads upstream chunks into ``buffer``; a token in ``wakeup`` means "look again"."""

    def __init__(self, model: str, idle: float) -> None:
        self.model = model
        self.idle = idle
        self.buffer = bytearray()
        self.done = False
        self.error: TrioserveError | None = None
        self._wake_send, self.wakeup = trio.open_memory_channel[None](1)

    def _wake(self) -> None:
        # A full channel already holds a wake-up the sender has not taken yet.
        with contextlib.suppress(trio.WouldBlock):
            self._wake_send.send_nowait(None)

    async def run(self, chunks: Any) -> None:
        try:
            # One scope whose deadline moves with each chunk: cheaper than a scope per chunk.
            with trio.CancelScope(deadline=trio.current_time() + self.idle) as gap:
                async for chunk in chunks:
                    self.buffer += chunk
                    self._wake()
                    gap.deadline = trio.current_time() + self.idle
            if gap.cancelled_caught:
                self.error = RequestTimeout(
                    f"model {self.model!r} sent nothing for stream_idle_timeout "
                    f"({self.idle:g}s); the upstream request was aborted"
                )
        except httpx.HTTPError as exc:
            self.error = UpstreamError(
                f"model {self.model!r} closed the stream mid-answer: {exc!r}"
            )
        finally:
            self.done = True
            self._wake()


class Relay:
    def __init__(
        self, config: Config, supervisor: Supervisor, http: httpx.AsyncClient, metrics: Metrics
    ) -> None:
        self.config = config
        self.supervisor = supervisor
        self.http = http
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange = _Exchange(scope, send)
        server = self.config.server
        try:
            with trio.move_on_after(server.request_timeout) as whole:
                with trio.move_on_after(BODY_READ_TIMEOUT) as body_read:
                    body = await self._read_body(scope, receive, server.max_body_bytes)
                if body_read.cancelled_caught:
                    raise InvalidRequest(
                        f"request body not received within {BODY_READ_TIMEOUT:g}s", status=408
                    )
                async with trio.open_nursery() as nursery:
                    # The client going away cancels everything this request does, upstream
                    # included, at once.
                    nursery.start_soon(
                        self._watch_disconnect, receive, nursery.cancel_scope, exchange
                    )
                    await self._handle(exchange, body)
                    nursery.cancel_scope.cancel()
            if exchange.client_gone:
                raise _ClientGone()
            if whole.cancelled_caught:
                raise RequestTimeout(
                    f"request_timeout ({server.request_timeout:g}s) passed; the upstream "
                    "request was aborted"
                )
            # The last send happens outside the watched scope: Hypercorn queues
            # `http.disconnect` from inside it, and a cancellation landing in Hypercorn's
            # send would leave the connection open.
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except* TrioserveError as group:
            await self._fail(exchange, _first_leaf(group))
        except* _ClientGone:
            self.metrics.cancelled(exchange.model or "-")
        finally:
            self.metrics.finished(
                exchange.model or "-",
                exchange.status or 499,
                trio.current_time() - exchange.start_clock,
            )

    async def _read_body(self, scope: Scope, receive: Receive, limit: int) -> bytes:
        declared = header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            # Refused before reading: a client cannot make us buffer more than the limit.
            raise RequestTooLarge(limit)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise RequestTooLarge(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _watch_disconnect(
        self, receive: Receive, scope: trio.CancelScope, exchange: _Exchange
    ) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                exchange.client_gone = True
                scope.cancel()
                return

    def _parse(self, body: bytes) -> tuple[dict[str, Any], str]:
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

    async def _handle(self, exchange: _Exchange, body: bytes) -> None:
        data, name = self._parse(body)
        model = self.supervisor.resolve(name)
        exchange.model = model.name
        exchange.streaming = data.get("stream") is True
        server = self.config.server
        first_byte_deadline = exchange.start_clock + server.first_byte_timeout
        progress_done = trio.Event()
        stop_progress = trio.Event()
        async with trio.open_nursery() as nursery:
            if exchange.streaming and server.loading_progress:
                nursery.start_soon(
                    self._progress, exchange, model.name, stop_progress, progress_done
                )
            else:
                progress_done.set()
            try:
                with trio.move_on_at(first_byte_deadline) as first_byte:
                    async with (
                        model.admission.slot(),
                        self.supervisor.lease(model.name) as lease,
                    ):
                        url = lease.endpoint.base_url + exchange.scope["path"]
                        await self._forward(
                            exchange, url, body, first_byte, stop_progress, progress_done
                        )
                if first_byte.cancelled_caught:
                    raise RequestTimeout(
                        f"no response from model {model.name!r} within first_byte_timeout "
                        f"({server.first_byte_timeout:g}s, queue and start included); the "
                        "upstream request was aborted"
                    )
            finally:
                stop_progress.set()

    async def _progress(
        self, exchange: _Exchange, name: str, stop: trio.Event, done: trio.Event
    ) -> None:
        """SSE comments while a streaming client waits, so it can show progress and no proxy
        times it out. Never sends while the main task does: the main task waits for ``done``."""
        try:
            with trio.move_on_after(PROGRESS_AFTER):
                await stop.wait()
            while not stop.is_set():
                model = self.supervisor.models[name]
                waited = trio.current_time() - exchange.start_clock
                if model.state is State.READY:
                    line = f": waiting for model {name} ({waited:.1f}s)\n\n"
                else:
                    line = f": loading model {name} ({waited:.1f}s)\n\n"
                async with exchange.send_lock:
                    if not exchange.started:
                        await self._start(exchange, 200, _SSE_HEADERS)
                    await exchange.send(
                        {"type": "http.response.body", "body": line.encode(), "more_body": True}
                    )
                with trio.move_on_after(PROGRESS_EVERY):
                    await stop.wait()
        finally:
            done.set()

    async def _start(
        self, exchange: _Exchange, status: int, headers: list[tuple[bytes, bytes]]
    ) -> None:
        exchange.started = True
        exchange.status = status
        await exchange.send({"type": "http.response.start", "status": status, "headers": headers})

    async def _forward(
        self,
        exchange: _Exchange,
        url: str,
        body: bytes,
        first_byte: trio.CancelScope,
        stop_progress: trio.Event,
        progress_done: trio.Event,
    ) -> None:
        request = self.http.build_request(
            "POST", url, content=body, headers={"content-type": "application/json"}
        )
        try:
            response = await self.http.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise UpstreamError(f"model {exchange.model!r} refused the request: {exc!r}") from exc
        try:
            async with aclosing(response.aiter_raw()) as chunks:  # type: ignore[type-var]
                await self._relay_response(
                    exchange, response, chunks, first_byte, stop_progress, progress_done
                )
        finally:
            # Closing a response that was not read to the end closes its connection: that is
            # what tells the backend to stop generating.
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 1):
                await response.aclose()

    async def _relay_response(
        self,
        exchange: _Exchange,
        response: httpx.Response,
        chunks: Any,
        first_byte: trio.CancelScope,
        stop_progress: trio.Event,
        progress_done: trio.Event,
    ) -> None:
        try:
            first = await chunks.__anext__()
        except StopAsyncIteration:
            first = b""
        except httpx.HTTPError as exc:
            raise UpstreamError(
                f"model {exchange.model!r} closed the connection before answering: {exc!r}"
            ) from exc
        # The first byte is here: from now on only the idle and request deadlines apply.
        first_byte.deadline = float("inf")
        exchange.first_byte_at = trio.current_time()
        self.metrics.first_byte(exchange.model, exchange.first_byte_at - exchange.start_clock)
        stop_progress.set()
        await progress_done.wait()
        if exchange.started:
            await self._continue_stream(exchange, response, first, chunks)
        elif exchange.streaming and response.status_code == 200:
            await self._start(exchange, 200, self._headers(response))
            await self._relay_rest(exchange, first, chunks, streaming=True)
        else:
            await self._relay_whole(exchange, response, first, chunks)

    def _headers(self, response: httpx.Response) -> list[tuple[bytes, bytes]]:
        headers = [(k, v) for k, v in response.headers.raw if k.lower() in _PASSED_HEADERS]
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            headers.append((b"x-accel-buffering", b"no"))
        return headers

    async def _continue_stream(
        self, exchange: _Exchange, response: httpx.Response, first: bytes, chunks: Any
    ) -> None:
        """Progress comments already started a 200 SSE response: an upstream error can only be
        told as a final error event now."""
        if response.status_code != 200:
            rest = [first]
            async for chunk in chunks:
                rest.append(chunk)
            raise UpstreamError(
                f"model {exchange.model!r} answered {response.status_code}: "
                + b"".join(rest).decode("utf-8", "replace")[:500]
            )
        await self._relay_rest(exchange, first, chunks, streaming=True)

    async def _relay_rest(
        self, exchange: _Exchange, first: bytes, chunks: Any, *, streaming: bool
    ) -> None:
        """Relay the rest of a stream, coalescing: a reader task appends upstream chunks to a
        buffer while this task sends whatever has accumulated in one ``send``.

        When the client keeps up, each chunk goes out as soon as it arrives; when sending is
        the bottleneck (many streams, fast tokens), chunks that arrived meanwhile go out
        together, so the per-send cost (Hypercorn, h11, a syscall) is paid once per batch
        instead of once per token.
        """
        pump = _Pump(exchange.model, self.config.server.stream_idle_timeout)
        pump.buffer += first
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump.run, chunks)
            send = exchange.send
            while True:
                if not pump.buffer and not pump.done:
                    await pump.wakeup.receive()
                if pump.buffer:
                    data = bytes(pump.buffer)
                    pump.buffer.clear()
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                elif pump.done:
                    break
        if pump.error is not None:
            raise pump.error

    async def _relay_whole(
        self, exchange: _Exchange, response: httpx.Response, first: bytes, chunks: Any
    ) -> None:
        # Non-streaming answers are read whole before we answer, so an upstream that dies
        # half-way gives the client a clean 502 rather than truncated JSON.
        parts = [first]
        idle = self.config.server.stream_idle_timeout
        while True:
            with trio.move_on_after(idle) as gap:
                try:
                    parts.append(await chunks.__anext__())
                except StopAsyncIteration:
                    break
                except httpx.HTTPError as exc:
                    raise UpstreamError(
                        f"model {exchange.model!r} closed the connection mid-answer: {exc!r}"
                    ) from exc
            if gap.cancelled_caught:
                raise RequestTimeout(
                    f"model {exchange.model!r} stalled for stream_idle_timeout ({idle:g}s)"
                )
        payload = b"".join(parts)
        headers = self._headers(response)
        headers.append((b"content-length", str(len(payload)).encode()))
        await self._start(exchange, response.status_code, headers)
        await exchange.send({"type": "http.response.body", "body": payload, "more_body": True})

    async def _fail(self, exchange: _Exchange, error: TrioserveError) -> None:
        self.metrics.error(exchange.model or "-", error.code)
        if isinstance(error, RequestTimeout):
            self.metrics.cancelled(exchange.model or "-")
        try:
            if not exchange.started:
                exchange.status = error.status
                exchange.started = True
                await send_error(exchange.send, error)
            else:
                # A stream has begun: one last event carries the error, then the stream ends.
                event = b"data: " + error.body_bytes() + b"\n\n"
                await exchange.send(
                    {"type": "http.response.body", "body": event, "more_body": True}
                )
                await exchange.send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client is gone too


def _first_leaf(group: BaseExceptionGroup[TrioserveError]) -> TrioserveError:
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    assert isinstance(error, TrioserveError)
    return error
