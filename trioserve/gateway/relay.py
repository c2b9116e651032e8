"""The relay: one client request → admission → a lease on a ready model → upstream → client.

Written against raw ASGI rather than through Quart: this is the per-chunk hot path, and each
framework layer a chunk passes through costs throughput and event-loop time that ``/health``
and every other stream then wait for. Everything one upstream read brought goes to the client
in one send (``UpstreamResponse.receive_some``, ``Downstream.send_body``).

Deadlines are cancel scopes at the call site: ``request_timeout`` around everything,
``first_byte_timeout`` around queue + start + first upstream byte, ``stream_idle_timeout``
between upstream reads (``IdleDeadline``). Leaving any of them closes the upstream response,
which closes its connection, so the backend sees the disconnect and stops generating. So does
the client going away: ``RelayedRequest.watch_disconnect`` cancels the upstream side at once.

Which paths, and how each differs (light, assembled, Anthropic's dialect, uploads): ``apis.py``.
``/upstream/{model}/{path}`` passes any request through to that model's server, for whom
``upstream_passthrough`` allows.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import trio

from trioserve.config import Config
from trioserve.errors import (
    InvalidRequest,
    RateLimited,
    RequestTimeout,
    TrioserveError,
    UpstreamError,
)
from trioserve.gateway import answer
from trioserve.gateway.admin_access import AdminAccess
from trioserve.gateway.asgi import Receive, Scope, Send, header, presented_key
from trioserve.gateway.assemble import upstream_body
from trioserve.gateway.downstream import Downstream, Headers
from trioserve.gateway.metrics import Metrics
from trioserve.gateway.passthrough import passthrough_target, passthrough_user, relayed_api
from trioserve.gateway.progress import CLOSE, send_progress
from trioserve.gateway.request import ClientGone, RelayedRequest, parse_body, read_body
from trioserve.gateway.upload import Upload, begin_upload
from trioserve.gateway.upstream import JSON, KeepAlivePool, UpstreamResponse
from trioserve.gateway.usage import UsageBook, usage_in_body
from trioserve.sharing.budgets import UserBudget, ratelimit_headers
from trioserve.sharing.identity import User, identify, keys_required
from trioserve.supervision.lifecycle import State
from trioserve.supervision.model import ManagedModel
from trioserve.supervision.supervisor import Supervisor

if TYPE_CHECKING:
    from trioserve.supervision.model import Endpoint

__all__ = ["BODY_READ_TIMEOUT", "IN_PROCESS_USER_KEY", "Relay"]

# Where an in-process caller (trioserve.mcp) puts the ``User`` a request is made as, in
# ``scope["state"]``: MCP decided it from the /mcp request's key (or admin: the user "admin",
# which has no /v1 key). Only code in this process can set a scope's state; the server never
# puts this key there for a connection.
IN_PROCESS_USER_KEY = "trioserve.in_process_user"
# A client that trickles its body (slowloris) is cut off after this long. (An upload's body
# only until its model is known: the rest is streamed to the model, within request_timeout.)
BODY_READ_TIMEOUT = 30.0
# Longest an error answer to an upload waits for the rest of the upload to be read and dropped.
UPLOAD_DRAIN_TIMEOUT = 30.0


class Relay:
    """The ASGI app of ``RelayPaths``: one per daemon, called once per request."""

    def __init__(
        self,
        config: Config,
        supervisor: Supervisor,
        pool: KeepAlivePool,
        metrics: Metrics,
        usage: UsageBook,
        access: AdminAccess | None = None,
    ) -> None:
        # Replaced whole by a reload: a request reads it once per step, never half of two.
        self.config = config
        self.supervisor = supervisor
        self.pool = pool
        self.metrics = metrics
        self.usage = usage
        # Who is admin, for /upstream (None: nobody but the admin socket's peers).
        self.access = access or AdminAccess(None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        api = relayed_api(scope["method"], scope["path"])
        assert api is not None, "the gateway routes only the relay's paths here"
        request = RelayedRequest(scope, Downstream(send, api.dialect), api)
        server = self.config.server
        answered = False
        try:
            with trio.move_on_after(server.request_timeout) as whole:
                await self._receive_and_serve(request, receive)
            if request.client_gone:
                raise ClientGone()
            if whole.cancelled_caught:
                raise RequestTimeout(
                    f"request_timeout ({server.request_timeout:g}s) passed; the upstream "
                    "request was aborted"
                )
            # Answered from here on: these sends complete the response, and Hypercorn may
            # still raise Cancelled inside the last one after every byte is out.
            answered = True
            await self._send_last(request)
        except* TrioserveError as group:
            answered = True
            await self._fail(request, _first_leaf(group))
        except* ClientGone:
            self.metrics.cancelled(request.model or "-")
            answered = True
        finally:
            if not answered and trio.current_effective_deadline() == -math.inf:
                # Cancelled from outside: the daemon stops and its grace for requests has
                # passed. The client gets an error it can read (shielded, bounded) rather than
                # a bare 500 from Hypercorn or a dropped connection.
                await self._fail(
                    request, UpstreamError("trioserve is shutting down; the request was aborted")
                )
            status = request.out.status or 499
            self.metrics.finished(
                request.model or "-", status, trio.current_time() - request.start_clock
            )
            if request.model:
                self.usage.finished(request.user, request.model, status, request.usage)

    async def _receive_and_serve(self, request: RelayedRequest, receive: Receive) -> None:
        """The body, the model it names, then the upstream side while the client is there."""
        scope = request.scope
        passthrough = request.api.passthrough
        # The key first, before any byte of the body is read: 401 whatever the body holds.
        trusted = (scope.get("state") or {}).get(IN_PROCESS_USER_KEY)
        if isinstance(trusted, User):
            request.user = trusted
        elif passthrough:
            request.user = passthrough_user(self.config, self.access, scope, _client_host(request))
        else:
            request.user = identify(self.config, presented_key(scope), None, _client_host(request))
        # Budgets next, still before the body: a user over budget costs no body read. (Only
        # a configured user's key gives a user budgets, and the body's `user` never names one.)
        budget = self.usage.budgets.get(request.user.name)
        if budget is not None:
            _admit(request, budget)
        body: bytes | Upload
        with trio.move_on_after(BODY_READ_TIMEOUT) as body_read:
            if passthrough:
                name, request.target = passthrough_target(scope)
                body = await read_body(scope, receive, self.config.server.max_body_bytes)
            elif request.api.upload:
                body = await begin_upload(scope, receive, self.config.server.max_upload_bytes)
                name = body.model
            else:
                body = await read_body(scope, receive, self.config.server.max_body_bytes)
        if body_read.cancelled_caught:
            raise InvalidRequest(
                f"request body not received within {BODY_READ_TIMEOUT:g}s", status=408
            )
        if isinstance(body, Upload):
            request.target = scope["path"]
            # An error answered before the upload was sent on must first take the rest of it:
            # see ``_fail``.
            request.unread = receive
            async with body:
                await self._relay(request, receive, self.supervisor.resolve(name), body)
            return
        if not passthrough:
            data, name = parse_body(body)
            request.target = scope["path"]
            request.streaming = data.get("stream") is True
            if not keys_required(self.config) and data.get("user") and trusted is None:
                # No key identifies users (none are configured): the body's `user` does.
                request.user = identify(self.config, None, data["user"], _client_host(request))
        model = self.supervisor.resolve(name)
        kind = request.api.assemble
        if kind is not None and not request.streaming and model.config.stream_upstream:
            # Sent upstream as a stream: a backend notices a closed connection at once only
            # while it writes a stream (llama-server), so a hang-up or deadline stops it.
            request.assemble = kind
            body = upstream_body(kind, data, body)
        request.body_read.set()
        await self._relay(request, receive, model, body)

    async def _relay(
        self, request: RelayedRequest, receive: Receive, model: ManagedModel, body: bytes | Upload
    ) -> None:
        request.model = model.name
        error: TrioserveError | None = None
        async with trio.open_nursery() as nursery:
            # The client going away cancels everything this request does, upstream
            # included, at once.
            nursery.start_soon(request.watch_disconnect, receive, nursery.cancel_scope)
            error = await self._serve(request, model, body)
            nursery.cancel_scope.cancel()
        if error is not None:
            raise error

    async def _serve(
        self, request: RelayedRequest, model: ManagedModel, body: bytes | Upload
    ) -> TrioserveError | None:
        """Run the upstream side (and progress comments); returns the error to report.

        A ``TrioserveError`` is returned, not raised through the nursery, so that ``_fail``
        can first send a stream's last chunks, then the error event.
        """
        async with trio.open_nursery() as nursery:
            # Progress comments only when this request may have to wait (a model not ready,
            # or no free slot): the extra task costs time to first byte otherwise
            # (docs/performance.md, "the per-chunk path").
            may_wait = model.state is not State.READY or (
                not request.api.light and model.admission.would_wait(request.user)
            )
            if request.streaming and self.config.server.loading_progress and may_wait:
                nursery.start_soon(send_progress, request, self.supervisor)
            try:
                await self._upstream(request, model, body)
            except TrioserveError as exc:
                return exc
            finally:
                request.answering.set()
        return None

    async def _upstream(
        self, request: RelayedRequest, model: ManagedModel, body: bytes | Upload
    ) -> None:
        """A slot (light requests take none: they never wait behind a generation), a lease on
        the ready model, the exchange with it; ``first_byte_timeout`` bounds all of it until
        the first byte of the answer."""
        server = self.config.server
        with trio.move_on_at(request.start_clock + server.first_byte_timeout) as first_byte:
            if request.api.light:
                await self._leased(request, model, body, first_byte)
            else:
                async with model.admission.slot(request.user) as waited:
                    self.usage.waited(request.user, model.name, waited)
                    await self._leased(request, model, body, first_byte)
        if first_byte.cancelled_caught:
            # Its start still waits for memory or a slot: say why (the first thing to fix).
            waiting = f"; its start was {model.waiting_for}" if model.waiting_for else ""
            raise RequestTimeout(
                f"no response from model {model.name!r} within first_byte_timeout "
                f"({server.first_byte_timeout:g}s, queue and start included){waiting}; the "
                "upstream request was aborted"
            )

    async def _leased(
        self,
        request: RelayedRequest,
        model: ManagedModel,
        body: bytes | Upload,
        first_byte: trio.CancelScope,
    ) -> None:
        done = False
        try:
            async with self.supervisor.lease(model) as lease:
                await self._forward(request, lease.endpoint, body, first_byte)
                done = True
        except UpstreamError:
            # The model went away after its answer was complete: nothing was lost.
            if not done:
                raise

    async def _forward(
        self,
        request: RelayedRequest,
        endpoint: Endpoint,
        body: bytes | Upload,
        first_byte: trio.CancelScope,
    ) -> None:
        scope = request.scope
        if isinstance(body, Upload):
            response = await self.pool.request(
                endpoint, request.target, _UploadBody(body, request), content_type=body.content_type
            )
        else:
            content_type: bytes | None = JSON
            if request.api.passthrough:
                # Passed through as the client sent it (a GET has none).
                content_type = header(scope, b"content-type") or (JSON if body else None)
            response = await self.pool.request(
                endpoint,
                request.target,
                body,
                method=scope["method"].encode(),
                content_type=content_type,
            )
        try:
            first = await response.receive_some()
            if request.assemble is None:
                # The first byte is here: from now on only the idle and request deadlines
                # apply. (An assembled answer's first byte is its end, as without the stream.)
                first_byte.deadline = math.inf
            self.metrics.first_byte(request.model, trio.current_time() - request.start_clock)
            request.answering.set()
            await self._answer(request, response, first)
        finally:
            # Closing a response that was not read to the end closes its connection: that is
            # what tells the backend to stop generating.
            response.close()

    async def _answer(
        self, request: RelayedRequest, response: UpstreamResponse, first: bytes
    ) -> None:
        """Stream the answer to the client, or read it whole for ``_send_last``."""
        out = request.out
        status = response.status
        idle = self.config.server.stream_idle_timeout
        if out.started:
            # Progress comments already began a 200 SSE response: an upstream error can only
            # be told as a final error event now.
            if status != 200:
                text = await answer.read_whole(request, response, first, idle)
                raise UpstreamError(
                    f"model {request.model!r} answered {status}: "
                    + text.decode("utf-8", "replace")[:500]
                )
            await answer.stream(request, response, first, idle)
        elif request.streaming and status == 200:
            await out.start(200, self._headers(response))
            await answer.stream(request, response, first, idle)
        elif request.assemble is not None:
            request.reply = await answer.assemble(request, response, first, idle)
        elif request.api.passthrough or (status == 200 and not _is_json(response)):
            # A model server's own pages, or a binary answer (audio): sent on as they come.
            await out.start(status, self._headers(response))
            await answer.pipe(request, response, first, idle)
        else:
            # Non-streaming answers are read whole before we answer, so an upstream that dies
            # half-way gives the client a clean 502 rather than truncated JSON.
            payload = await answer.read_whole(request, response, first, idle)
            headers = self._headers(response)
            headers.append((b"content-length", str(len(payload)).encode()))
            request.reply = (status, headers, payload)
            request.usage = usage_in_body(payload)

    def _headers(self, response: UpstreamResponse) -> Headers:
        """The client's response head, made from the upstream one."""
        headers = list(response.headers)
        if response.is_event_stream:
            headers.append((b"x-accel-buffering", b"no"))
            headers.append(CLOSE)
        return headers

    async def _send_last(self, request: RelayedRequest) -> None:
        """The last sends, outside the scope the disconnect watcher cancels: Hypercorn queues
        ``http.disconnect`` from inside them, and a cancellation landing in Hypercorn's send
        would leave the connection open."""
        out = request.out
        if request.reply is None:
            await out.send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        status, headers, payload = request.reply
        if out.extra:
            headers = [*headers, *out.extra]
        out.status = status
        await out.send({"type": "http.response.start", "status": status, "headers": headers})
        await out.send({"type": "http.response.body", "body": payload, "more_body": False})

    async def _fail(self, request: RelayedRequest, error: TrioserveError) -> None:
        model = request.model or "-"
        self.metrics.error(model, error.code)
        if isinstance(error, RequestTimeout):
            self.metrics.cancelled(model)
        # A stop that already cancelled the request: its error goes out at once, undrained.
        shutting_down = trio.current_effective_deadline() == -math.inf
        if request.unread is not None and not request.body_read.is_set() and not shutting_down:
            # The upload stopped being read (its model was starting, or the request waited for
            # a slot): Hypercorn's queue of body messages is full, and it would wait, inside
            # our answer's last send, to queue the end of the request there; a client that
            # sends its whole body before reading (httpx, the SDKs) would wait for its own
            # timeout. The rest of the body (bounded by max_upload_bytes) is read and dropped.
            with trio.move_on_after(UPLOAD_DRAIN_TIMEOUT):
                await _discard_body(request.unread)
        await request.out.fail(error)


def _admit(request: RelayedRequest, budget: UserBudget) -> None:
    """Count the request against its user's budgets, or refuse it (429 ``rate_limited``, with
    ``Retry-After``); either answer carries the budgets' ``x-ratelimit-*`` headers, as they
    are once this request is counted. O(1): no store, no lock, no await."""
    now = time.time()
    refusal = budget.admit(now)
    if budget.limits.any:
        request.out.extra = ratelimit_headers(budget.remaining(now))
    if refusal is not None:
        raise RateLimited(
            request.user.name, refusal.budget, refusal.limit, refusal.used, refusal.retry_after
        )


async def _discard_body(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            return


class _UploadBody:
    """An upload as the pool sends it. Once the last of it is sent, the client's body has
    been read, and from then on the disconnect watcher listens to the client. (An iterator,
    not an async generator: one left half-read, when the model stops reading, needs no
    closing.)"""

    def __init__(self, upload: Upload, request: RelayedRequest) -> None:
        self.length = upload.length
        self._chunks = upload.chunks()
        self._read = request.body_read

    def chunks(self) -> AsyncIterator[bytes]:
        return self

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await anext(self._chunks)
        except StopAsyncIteration:
            self._read.set()
            raise


def _is_json(response: UpstreamResponse) -> bool:
    return any(
        name.lower() == b"content-type" and value.startswith(b"application/json")
        for name, value in response.headers
    )


def _client_host(request: RelayedRequest) -> str | None:
    client = request.scope.get("client")
    return client[0] if client else None


def _first_leaf(group: BaseExceptionGroup[TrioserveError]) -> TrioserveError:
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    assert isinstance(error, TrioserveError)
    return error
