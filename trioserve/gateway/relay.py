"""The relay: one client request → admission → a lease on a ready model → upstream → client.

Written against raw ASGI rather than through Quart: this is the per-chunk hot path, and each
framework layer a chunk passes through costs throughput and event-loop time that ``/health``
and every other stream then wait for. Sends to the client go through ``Downstream``: whatever one
upstream read brought is sent in one piece just before the next upstream read.

Deadlines are cancel scopes at the call site: ``request_timeout`` around everything,
``first_byte_timeout`` around queue + start + first upstream byte, ``stream_idle_timeout``
between upstream reads. Leaving any of them closes the upstream response, which closes its
connection, so the backend sees the disconnect and stops generating.
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

from trioserve.config import Config
from trioserve.errors import (
    InvalidRequest,
    RequestTimeout,
    RequestTooLarge,
    TrioserveError,
    UpstreamError,
)
from trioserve.gateway.asgi import Receive, Scope, Send, header, send_error
from trioserve.gateway.downstream import Downstream
from trioserve.gateway.metrics import Metrics
from trioserve.gateway.upstream import LeanStream
from trioserve.supervision.lifecycle import State
from trioserve.supervision.model import ManagedModel
from trioserve.supervision.supervisor import Supervisor

__all__ = ["Relay", "RelayPaths"]

log = logging.getLogger(__name__)

RelayPaths = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})

# Streamed responses end their connection: with Hypercorn 0.18, a client that closes a
# keep-alive connection after a chunked response leaves the socket in CLOSE_WAIT until the
# keep-alive timer. A stream is long next to one loopback TCP handshake.
_CLOSE = (b"connection", b"close")
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    # Tell nginx and friends not to buffer the stream.
    (b"x-accel-buffering", b"no"),
    _CLOSE,
]
# A client that trickles its body (slowloris) is cut off after this long.
BODY_READ_TIMEOUT = 30.0
# After this long without a ready model, a streaming client starts getting progress comments.
PROGRESS_AFTER = 1.0
PROGRESS_EVERY = 1.0
# At most this late (and at most 1/8 of the timeout) a stalled stream is cut.
IDLE_SLACK = 0.5
# The upstream request's headers besides Host and Content-Length. No Accept-Encoding: a
# compressed answer would be relayed without its Content-Encoding.
_UPSTREAM_HEADERS = {"content-type": "application/json"}
_MAX_CACHED_URLS = 1024
_CLOSED = httpx.ByteStream(b"")
# Copied from the upstream response; hop-by-hop and length headers are ours to set.
_PASSED_HEADERS = frozenset({b"content-type", b"cache-control", b"x-request-id"})


class _ClientGone(Exception):
    pass


@dataclass
class _Exchange:
    """What one request knows about itself."""

    scope: Scope
    out: Downstream
    model: str = ""
    streaming: bool = False
    start_clock: float = field(default_factory=trio.current_time)
    client_gone: bool = False
    # A whole answer (non-streaming): sent after the upstream side is done, in two sends,
    # outside the scope the client's disconnect cancels.
    reply: tuple[int, list[tuple[bytes, bytes]], bytes] | None = None


class Relay:
    def __init__(
        self, config: Config, supervisor: Supervisor, http: httpx.AsyncClient, metrics: Metrics
    ) -> None:
        self.config = config
        self.supervisor = supervisor
        self.http = http
        self.metrics = metrics
        self._urls: dict[str, httpx.URL] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange = _Exchange(scope, Downstream(send))
        server = self.config.server
        answered = False
        try:
            with trio.move_on_after(server.request_timeout) as whole:
                with trio.move_on_after(BODY_READ_TIMEOUT) as body_read:
                    body = await self._read_body(scope, receive, server.max_body_bytes)
                if body_read.cancelled_caught:
                    raise InvalidRequest(
                        f"request body not received within {BODY_READ_TIMEOUT:g}s", status=408
                    )
                data, name = self._parse(body)
                model = self.supervisor.resolve(name)
                exchange.model = model.name
                exchange.streaming = data.get("stream") is True
                error: TrioserveError | None = None
                async with trio.open_nursery() as nursery:
                    # The client going away cancels everything this request does, upstream
                    # included, at once.
                    nursery.start_soon(
                        self._watch_disconnect, receive, nursery.cancel_scope, exchange
                    )
                    error = await self._serve(exchange, model, body)
                    nursery.cancel_scope.cancel()
                if error is not None:
                    raise error
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
            # Answered from here on: these sends complete the response, and Hypercorn may
            # still raise Cancelled inside the last one after every byte is out.
            answered = True
            if exchange.reply is not None:
                status, headers, payload = exchange.reply
                exchange.out.status = status
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": payload, "more_body": False})
            else:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except* TrioserveError as group:
            answered = True
            await self._fail(exchange, _first_leaf(group))
        except* _ClientGone:
            self.metrics.cancelled(exchange.model or "-")
            answered = True
        finally:
            if not answered and trio.current_effective_deadline() == -math.inf:
                # Cancelled from outside: the daemon stops and its grace for requests has
                # passed. The client gets an error it can read (shielded, bounded) rather than
                # a bare 500 from Hypercorn or a dropped connection.
                await self._fail(
                    exchange, UpstreamError("trioserve is shutting down; the request was aborted")
                )
            self.metrics.finished(
                exchange.model or "-",
                exchange.out.status or 499,
                trio.current_time() - exchange.start_clock,
            )

    async def _read_body(self, scope: Scope, receive: Receive, limit: int) -> bytes:
        declared = header(scope, b"content-length")
        if declared is not None and header(scope, b"transfer-encoding") is not None:
            # Two framings at once is how requests are smuggled past proxies that disagree
            # on which one wins (RFC 9112 6.3): refused, not guessed.
            raise InvalidRequest("both Content-Length and Transfer-Encoding are set")
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

    async def _serve(
        self, exchange: _Exchange, model: ManagedModel, body: bytes
    ) -> TrioserveError | None:
        """Run the upstream side (and progress comments); returns the error to report.

        A ``TrioserveError`` is returned, not raised through the nursery, so that ``_fail``
        can first send a stream's last chunks, then the error event.
        """
        error: TrioserveError | None = None
        stop_progress = trio.Event()
        async with trio.open_nursery() as nursery:
            # Progress comments only when this request may have to wait (a model not ready,
            # or no free slot): the extra task cost ~0.3 ms of time to first byte otherwise.
            may_wait = model.state is not State.READY or model.admission.full
            if exchange.streaming and self.config.server.loading_progress and may_wait:
                nursery.start_soon(self._progress, exchange, model.name, stop_progress)
            try:
                await self._upstream(exchange, model, body, stop_progress)
            except TrioserveError as exc:
                error = exc
            finally:
                stop_progress.set()
        return error

    async def _progress(self, exchange: _Exchange, name: str, stop: trio.Event) -> None:
        """SSE comments while a streaming client waits, so it can show progress and no proxy
        times it out."""
        with trio.move_on_after(PROGRESS_AFTER):
            await stop.wait()
        out = exchange.out
        while not stop.is_set():
            waited = trio.current_time() - exchange.start_clock
            if self.supervisor.models[name].state is State.READY:
                line = f": waiting for model {name} ({waited:.1f}s)\n\n"
            else:
                line = f": loading model {name} ({waited:.1f}s)\n\n"
            if not out.started:
                await out.start(200, _SSE_HEADERS)
            out.write(line.encode())
            await out.flush()
            with trio.move_on_after(PROGRESS_EVERY):
                await stop.wait()

    async def _upstream(
        self, exchange: _Exchange, model: ManagedModel, body: bytes, stop_progress: trio.Event
    ) -> None:
        server = self.config.server
        with trio.move_on_at(exchange.start_clock + server.first_byte_timeout) as first_byte:
            async with model.admission.slot():
                done = False
                try:
                    async with self.supervisor.lease(model.name) as lease:
                        url = lease.endpoint.base_url + exchange.scope["path"]
                        await self._forward(exchange, url, body, first_byte, stop_progress)
                        done = True
                except UpstreamError:
                    # The model went away after its answer was complete: nothing was lost.
                    if not done:
                        raise
        if first_byte.cancelled_caught:
            raise RequestTimeout(
                f"no response from model {model.name!r} within first_byte_timeout "
                f"({server.first_byte_timeout:g}s, queue and start included); the "
                "upstream request was aborted"
            )

    async def _forward(
        self,
        exchange: _Exchange,
        url: str,
        body: bytes,
        first_byte: trio.CancelScope,
        stop_progress: trio.Event,
    ) -> None:
        # Built by hand, not by the client: no client-wide headers or cookies are merged in
        # (the body is forwarded as it came, and nothing of one user's exchange reaches
        # another's), and the URL is parsed once per model and path.
        request = httpx.Request("POST", self._url(url), content=body, headers=_UPSTREAM_HEADERS)
        response = await self._send_upstream(exchange, request)
        try:
            async with aclosing(response.aiter_raw()) as chunks:  # type: ignore[type-var]
                await self._relay(exchange, response, chunks, first_byte, stop_progress)
        finally:
            # Closing a response that was not read to the end closes its connection: that is
            # what tells the backend to stop generating.
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 1):
                await response.aclose()
            # httpx's response and its stream reference each other: cut, so that reference
            # counting frees them now rather than the garbage collector later.
            response.stream = _CLOSED

    def _url(self, url: str) -> httpx.URL:
        parsed = self._urls.get(url)
        if parsed is None:
            if len(self._urls) >= _MAX_CACHED_URLS:
                self._urls.clear()  # ports change as models restart
            parsed = self._urls[url] = httpx.URL(url)
        return parsed

    async def _send_upstream(self, exchange: _Exchange, request: httpx.Request) -> httpx.Response:
        # A pooled connection the server has just closed (llama-server closes after every
        # stream yet advertises keep-alive) fails before any response byte: the request was
        # not processed, so one retry on a fresh connection is safe.
        for attempt in (1, 2):
            try:
                return await self.http.send(request, stream=True)
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                if attempt == 2:
                    raise UpstreamError(
                        f"model {exchange.model!r} closed the connection: {exc!r}"
                    ) from exc
            except httpx.HTTPError as exc:
                raise UpstreamError(
                    f"model {exchange.model!r} refused the request: {exc!r}"
                ) from exc
        raise AssertionError("unreachable")

    async def _relay(
        self,
        exchange: _Exchange,
        response: httpx.Response,
        chunks: Any,
        first_byte: trio.CancelScope,
        stop_progress: trio.Event,
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
        self.metrics.first_byte(exchange.model, trio.current_time() - exchange.start_clock)
        stop_progress.set()
        out = exchange.out
        status = response.status_code
        if out.started:
            # Progress comments already began a 200 SSE response: an upstream error can only
            # be told as a final error event now.
            if status != 200:
                rest = first + await self._read_rest(exchange, chunks)
                raise UpstreamError(
                    f"model {exchange.model!r} answered {status}: "
                    + rest.decode("utf-8", "replace")[:500]
                )
            out.write(first)
            await self._stream_rest(exchange, response, chunks)
        elif exchange.streaming and status == 200:
            await out.start(200, self._headers(response))
            out.write(first)
            await self._stream_rest(exchange, response, chunks)
        else:
            # Non-streaming answers are read whole before we answer, so an upstream that dies
            # half-way gives the client a clean 502 rather than truncated JSON.
            payload = first + await self._read_rest(exchange, chunks)
            headers = self._headers(response)
            headers.append((b"content-length", str(len(payload)).encode()))
            exchange.reply = (status, headers, payload)

    def _headers(self, response: httpx.Response) -> list[tuple[bytes, bytes]]:
        headers = [(k, v) for k, v in response.headers.raw if k.lower() in _PASSED_HEADERS]
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            headers.append((b"x-accel-buffering", b"no"))
            headers.append(_CLOSE)
        return headers

    async def _stream_rest(
        self, exchange: _Exchange, response: httpx.Response, chunks: Any
    ) -> None:
        out = exchange.out
        idle = self.config.server.stream_idle_timeout
        network = response.extensions.get("network_stream")
        lean = network if isinstance(network, LeanStream) else None
        slack = _idle_slack(idle)
        # One scope for the whole stream, its deadline moved at most once per `slack`: a
        # scope per chunk, or a deadline moved per chunk, costs more than the chunk's send.
        with trio.CancelScope(deadline=trio.current_time() + idle + slack) as gap:

            async def flush() -> None:
                await out.flush()
                # Time a slow client took is not the model's silence.
                now = trio.current_time()
                if gap.deadline < now + idle:
                    gap.deadline = now + idle + slack

            # Our pool's connections send what we hold just before each read of theirs: one
            # send per upstream read, however many chunks it carried. Any other: one send per
            # chunk. (The pool unhooks the connection when it takes it back.)
            if lean is not None:
                lean.before_read = flush
            try:
                async for chunk in chunks:
                    out.write(chunk)
                    if lean is None:
                        await out.flush()
                    now = trio.current_time()
                    if gap.deadline < now + idle:
                        gap.deadline = now + idle + slack
            except httpx.HTTPError as exc:
                raise UpstreamError(
                    f"model {exchange.model!r} closed the stream mid-answer: {exc!r}"
                ) from exc
            finally:
                if lean is not None:
                    lean.before_read = None
            await out.flush()
        if gap.cancelled_caught:
            raise RequestTimeout(
                f"model {exchange.model!r} sent nothing for stream_idle_timeout "
                f"({idle:g}s); the upstream request was aborted"
            )

    async def _read_rest(self, exchange: _Exchange, chunks: Any) -> bytes:
        parts: list[bytes] = []
        idle = self.config.server.stream_idle_timeout
        slack = _idle_slack(idle)
        with trio.CancelScope(deadline=trio.current_time() + idle + slack) as gap:
            try:
                async for chunk in chunks:
                    parts.append(chunk)
                    now = trio.current_time()
                    if gap.deadline < now + idle:
                        gap.deadline = now + idle + slack
            except httpx.HTTPError as exc:
                raise UpstreamError(
                    f"model {exchange.model!r} closed the connection mid-answer: {exc!r}"
                ) from exc
        if gap.cancelled_caught:
            raise RequestTimeout(
                f"model {exchange.model!r} stalled for stream_idle_timeout ({idle:g}s)"
            )
        return b"".join(parts)

    async def _fail(self, exchange: _Exchange, error: TrioserveError) -> None:
        model = exchange.model or "-"
        self.metrics.error(model, error.code)
        if isinstance(error, RequestTimeout):
            self.metrics.cancelled(model)
        out = exchange.out
        with trio.CancelScope(shield=True, deadline=trio.current_time() + 5):
            if not out.started:
                out.status = error.status
                await send_error(out.send, error)
            elif not out.is_event_stream:
                # A plain body with a Content-Length is on its way: there is no way to say
                # "error" inside it. Sending nothing more makes Hypercorn close the connection,
                # so the client sees a truncated answer rather than corrupt JSON.
                return
            else:
                # A stream has begun: its last chunks, one last event with the error, the end.
                # After a model that died mid-event, the error starts an event of its own.
                await out.flush()
                separator = b"" if out.at_event_boundary else b"\n\n"
                out.write(separator + b"data: " + error.body_bytes() + b"\n\n")
                await out.flush()
                await out.send({"type": "http.response.body", "body": b"", "more_body": False})


def _idle_slack(idle: float) -> float:
    """How late past ``stream_idle_timeout`` a stalled upstream may be noticed: the deadline
    moves only when less than ``idle`` is left, so it fires between ``idle`` and
    ``idle + slack`` after the last chunk."""
    return min(IDLE_SLACK, idle / 8)


def _first_leaf(group: BaseExceptionGroup[TrioserveError]) -> TrioserveError:
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    assert isinstance(error, TrioserveError)
    return error
