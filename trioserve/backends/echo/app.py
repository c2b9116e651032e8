"""The echo server's ASGI 3 application: routes, the model's loading time, and the timing of
every answer (delays, disconnects, the crash trigger, the counters).

The answers themselves are built by pure modules, one per API: ``generation`` and ``replies``
(chat and completions), ``embeddings``. Adding an API is a module of that kind (parse the body,
raising ``RequestError``; build the answer's bytes) plus a handler and a line in ``_routes``
here. A generated answer goes through ``_generate``, so that its delays, disconnects and
counters are those of every other.

A streamed request that asks for usage is what trioserve sends upstream for a client's
non-streaming request; ``--response-delay`` therefore applies to it too, before its headers,
so that a slow non-streaming answer stays slow when it is relayed as a stream.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope, Scope

from trioserve.backends.echo.asgi import (
    DisconnectWatcher,
    read_body,
    send_json,
    start_json,
    start_sse,
)
from trioserve.backends.echo.embeddings import embeddings_answer
from trioserve.backends.echo.generation import Generation, parse_generation
from trioserve.backends.echo.options import EchoOptions, EchoStats
from trioserve.backends.echo.replies import Reply, plain_stream
from trioserve.backends.echo.request import RequestError, error_body

__all__ = ["EchoApp", "build_app"]

_Handler = Callable[[bytes, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class _Route:
    method: str
    handler: _Handler
    needs_model: bool  # answers 503 while the model is "loading", as llama-server does


class EchoApp:
    """The ASGI 3 application. ``stats`` counts generations by outcome."""

    def __init__(self, options: EchoOptions) -> None:
        self.options = options
        self.stats = EchoStats()
        self._chunks_sent = 0
        self._ready_at: float | None = None
        self._model_json = json.dumps(options.model_name)
        self._models_body = json.dumps(
            {
                "object": "list",
                "data": [
                    {
                        "id": options.model_name,
                        "object": "model",
                        "created": int(time.time()),
                        "owned_by": "trioserve",
                    }
                ],
            }
        ).encode()
        self._routes: dict[str, _Route] = {
            "/health": _Route("GET", self._health, needs_model=False),
            "/stats": _Route("GET", self._stats, needs_model=False),
            "/v1/models": _Route("GET", self._models, needs_model=True),
            "/v1/chat/completions": _Route("POST", self._chat, needs_model=True),
            "/v1/completions": _Route("POST", self._completions, needs_model=True),
            "/v1/embeddings": _Route("POST", self._embeddings, needs_model=True),
        }

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if self._ready_at is None:
            # The first call is hypercorn's lifespan startup, i.e. the moment the server starts;
            # taking the time here rather than in __init__ keeps the app free of a running clock.
            self._ready_at = trio.current_time() + self.options.startup_delay
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        # A websocket scope is left unanswered; hypercorn then refuses the handshake.

    @property
    def _loading(self) -> bool:
        return self._ready_at is not None and trio.current_time() < self._ready_at

    async def _lifespan(self, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(
        self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        route = self._routes.get(scope["path"])
        if route is None:
            await send_json(send, 404, error_body(f"No route for {scope['path']}.", "not_found"))
            return
        if scope["method"] != route.method:
            message = f"{scope['path']} only accepts {route.method}."
            await send_json(send, 405, error_body(message, "method_not_allowed"))
            return
        if route.needs_model and self._loading:
            body = error_body("Loading model", "model_loading", "unavailable_error")
            await send_json(send, 503, body)
            return
        request_body = await read_body(receive)
        if request_body is None:
            return
        try:
            await route.handler(request_body, receive, send)
        except RequestError as error:
            # Handlers raise only while parsing, before their first send.
            await send_json(send, error.status, error.body)

    async def _health(
        self, body: bytes, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if self._loading:
            await send_json(send, 503, b'{"status":"loading"}')
        else:
            await send_json(send, 200, b'{"status":"ok"}')

    async def _stats(
        self, body: bytes, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        await send_json(send, 200, self.stats.to_json())

    async def _models(
        self, body: bytes, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        await send_json(send, 200, self._models_body)

    async def _embeddings(
        self, body: bytes, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        await send_json(send, 200, embeddings_answer(body, self.options.model_name))

    async def _chat(
        self, body: bytes, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        await self._generate(parse_generation("chat", body, self.options.tokens), receive, send)

    async def _completions(
        self, body: bytes, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        generation = parse_generation("completion", body, self.options.tokens)
        await self._generate(generation, receive, send)

    async def _generate(
        self, generation: Generation, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        self.stats.started += 1
        ident = f"{'chatcmpl' if generation.kind == 'chat' else 'cmpl'}-echo{self.stats.started}"
        finished = False
        try:
            watcher = DisconnectWatcher(receive)
            last_body = b""
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watcher.run, nursery.cancel_scope)
                # An error before the stream (echo_error_after 0) is an HTTP status, as
                # llama-server answers when a streamed task fails before its first token.
                if generation.stream and generation.error_after != 0:
                    last_body = await self._stream(generation, ident, send)
                else:
                    last_body = await self._compute(generation, ident, send)
                nursery.cancel_scope.cancel()
            if watcher.client_left:
                return
            # The last send stays outside the watched scope: hypercorn delivers http.disconnect
            # from inside it once the response is complete, and a cancellation could land in the
            # middle of hypercorn's connection recycling and break keep-alive.
            await send({"type": "http.response.body", "body": last_body, "more_body": False})
            finished = True
        finally:
            # Whatever stopped a generation early (the client leaving, the server shutting
            # down) counts as cancelled, so that no generation is ever unaccounted for.
            if finished:
                self.stats.completed += 1
            else:
                self.stats.cancelled += 1

    async def _compute(self, generation: Generation, ident: str, send: ASGISendCallable) -> bytes:
        """Sleeps as long as the whole generation takes, sends the headers, returns the body."""
        options = self.options
        tokens = generation.count
        if generation.error_after is not None:
            tokens = min(tokens, generation.error_after)
        delay = options.response_delay + options.token_delay * tokens
        if delay > 0:
            await trio.sleep(delay)
        reply = Reply(generation, ident, int(time.time()), options.model_name)
        status, body = reply.answer()
        await start_json(send, status, len(body))
        return body

    async def _stream(self, generation: Generation, ident: str, send: ASGISendCallable) -> bytes:
        """Sends the headers and one chunk per token (per choice); returns the stream's end."""
        options = self.options
        if generation.include_usage and options.response_delay > 0:
            # Likely a non-streaming request that trioserve relays as a stream: see the
            # module's docstring.
            await trio.sleep(options.response_delay)
        await start_sse(send)
        created = int(time.time())
        events: Iterable[bytes]
        if generation.plain:
            events, end = plain_stream(generation, ident, created, self._model_json)
        else:
            events, end = Reply(generation, ident, created, options.model_name).stream()
        delay = options.token_delay
        crash_after = options.crash_after
        for chunk in events:
            if delay > 0:
                await trio.sleep(delay)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            self._chunks_sent += 1
            if crash_after is not None and self._chunks_sent >= crash_after:
                os._exit(1)  # abrupt on purpose: no cleanup, as a segfaulting llama-server
        return end


def build_app(options: EchoOptions) -> EchoApp:
    """The echo server's ASGI application, for serving in-process or with ``serve``."""
    return EchoApp(options)
