"""The echo server's ASGI 3 application: routes, and the model's loading time.

The answers themselves are built by pure modules, one per API: ``generation`` and ``replies``
(chat and completions), ``embeddings``, ``responses``, ``messages``, ``native`` (llama.cpp's
``/completion`` and ``/infill``), ``rerank``, ``transcription``, ``speech``, ``tokens``,
``status``. Adding an API is a module of that kind (parse the body, raising ``RequestError``;
build the answer's bytes) plus a line in ``_routes`` here: a light answer (``_light``), sent at
once, never behind a generation; or a generated one (``_generated``: the module's ``Work``),
which ``runner.Generations`` times, so that its delays, disconnects and counters are those of
every other.

A streamed request that asks for usage is what trioserve sends upstream for a client's
non-streaming request; ``--response-delay`` therefore applies to it too, before its headers,
so that a slow non-streaming answer stays slow when it is relayed as a stream.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final
from urllib.parse import parse_qsl

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope, Scope

from trioserve.backends.echo.asgi import feed_body, read_body, send_json
from trioserve.backends.echo.embeddings import embeddings_answer
from trioserve.backends.echo.messages import count_tokens_answer, parse_messages
from trioserve.backends.echo.native import parse_completion, parse_infill
from trioserve.backends.echo.options import EchoOptions, EchoStats
from trioserve.backends.echo.request import RequestError
from trioserve.backends.echo.rerank import rerank_answer
from trioserve.backends.echo.responses import input_tokens_answer, parse_responses
from trioserve.backends.echo.runner import Generations
from trioserve.backends.echo.speech import parse_speech
from trioserve.backends.echo.status import (
    metrics_answer,
    props_answer,
    slot_action_answer,
    slots_answer,
)
from trioserve.backends.echo.tokens import (
    apply_template_answer,
    detokenize_answer,
    tokenize_answer,
)
from trioserve.backends.echo.transcription import Task, TranscriptionWork, Upload
from trioserve.backends.echo.work import Answer, Work, parse_chat, parse_completions

__all__ = ["EchoApp", "Request", "build_app"]

# llama-server's route for a slot's actions: /slots/{id}?action=...
_SLOT_PREFIX: Final = "/slots/"


@dataclass(frozen=True, slots=True)
class Request:
    """What a handler is given of the request."""

    path: str
    query: dict[str, str]
    content_type: str
    body: bytes  # empty for a route that reads the body itself


_Handler = Callable[[Request, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class _Route:
    method: str
    handler: _Handler
    needs_model: bool = True  # answers 503 while the model is "loading", as llama-server does
    llama_errors: bool = True  # refusals in llama-server's shape; the first APIs: OpenAI's
    reads_body: bool = True  # False: the handler reads the body as it arrives


class EchoApp:
    """The ASGI 3 application. ``stats`` counts generations by outcome."""

    def __init__(self, options: EchoOptions) -> None:
        self.options = options
        self.stats = EchoStats()
        self._generations = Generations(options, self.stats)
        self._ready_at: float | None = None
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
        stats, light, pure, generated = self.stats, self._light, self._pure, self._generated
        rerank = _Route("POST", pure(rerank_answer))
        self._routes: dict[str, _Route] = {
            "/health": _Route("GET", light(self._health), needs_model=False, llama_errors=False),
            "/stats": _Route(
                "GET", light(lambda _: stats.to_json()), needs_model=False, llama_errors=False
            ),
            "/v1/models": _Route("GET", light(lambda _: self._models_body), llama_errors=False),
            "/v1/chat/completions": _Route("POST", generated(parse_chat), llama_errors=False),
            "/v1/completions": _Route("POST", generated(parse_completions), llama_errors=False),
            "/v1/embeddings": _Route(
                "POST",
                light(lambda request: embeddings_answer(request.body, options.model_name)),
                llama_errors=False,
            ),
            "/v1/responses": _Route("POST", generated(parse_responses)),
            "/v1/responses/input_tokens": _Route("POST", pure(input_tokens_answer)),
            "/v1/messages": _Route("POST", generated(parse_messages)),
            "/v1/messages/count_tokens": _Route("POST", pure(count_tokens_answer)),
            "/v1/rerank": rerank,
            "/v1/reranking": rerank,
            "/rerank": rerank,
            "/reranking": rerank,
            "/v1/audio/transcriptions": self._upload("transcribe"),
            "/v1/audio/translations": self._upload("translate"),
            "/v1/audio/speech": _Route("POST", generated(parse_speech)),
            "/completion": _Route("POST", generated(parse_completion)),
            "/completions": _Route("POST", generated(parse_completion)),
            "/infill": _Route("POST", generated(parse_infill)),
            "/tokenize": _Route("POST", pure(tokenize_answer)),
            "/detokenize": _Route("POST", pure(detokenize_answer)),
            "/apply-template": _Route("POST", pure(apply_template_answer)),
            "/slots": _Route(
                "GET", light(lambda request: slots_answer(options, stats, request.query))
            ),
            _SLOT_PREFIX: _Route("POST", light(self._slot_action)),
            "/props": _Route("GET", light(lambda _: props_answer(options))),
            "/metrics": _Route("GET", light(lambda _: metrics_answer(options, stats))),
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

    def _route(self, path: str) -> _Route | None:
        route = self._routes.get(path)
        if route is None and path.startswith(_SLOT_PREFIX):
            return self._routes[_SLOT_PREFIX]
        return route

    async def _http(
        self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        path = scope["path"]
        route = self._route(path)
        try:
            if route is None:
                # As the echo always answered it; llama-server says "File Not Found".
                raise RequestError(404, f"No route for {path}.", "not_found")
            if scope["method"] != route.method:
                message = f"{path} only accepts {route.method}."
                raise RequestError(405, message, "method_not_allowed")
            if route.needs_model and self._loading:
                raise RequestError(503, "Loading model", "model_loading", "unavailable_error")
            body = b""
            if route.reads_body:
                read = await read_body(receive)
                if read is None:
                    return
                body = read
            headers = dict(scope["headers"])
            request = Request(
                path,
                dict(parse_qsl(scope["query_string"].decode("latin-1"))),
                headers.get(b"content-type", b"").decode("latin-1"),
                body,
            )
            await route.handler(request, receive, send)
        except RequestError as error:
            # Raised only while parsing, before a handler's first send.
            shaped = route is not None and route.llama_errors
            await send_json(send, error.status, error.llama_body if shaped else error.body)

    def _light(self, answer: Callable[[Request], bytes | Answer]) -> _Handler:
        """A handler that sends ``answer(request)`` at once (bytes: a 200 JSON answer)."""

        async def handler(
            request: Request, receive: ASGIReceiveCallable, send: ASGISendCallable
        ) -> None:
            answered = answer(request)
            if isinstance(answered, bytes):
                answered = Answer(200, answered)
            await send_json(send, answered.status, answered.body, answered.content_type)

        return handler

    def _pure(self, answer: Callable[[bytes, EchoOptions], bytes]) -> _Handler:
        """A handler that sends ``answer(body, options)`` at once: an API's pure module."""
        return self._light(lambda request: answer(request.body, self.options))

    def _generated(self, parse: Callable[[bytes, EchoOptions], Work]) -> _Handler:
        """A handler that generates ``parse(body, options)``, timed by ``Generations``."""

        async def handler(
            request: Request, receive: ASGIReceiveCallable, send: ASGISendCallable
        ) -> None:
            await self._generations.run(parse(request.body, self.options), receive, send)

        return handler

    def _upload(self, task: Task) -> _Route:
        """The route of an audio upload: the body is hashed as it arrives, then transcribed."""

        async def handler(
            request: Request, receive: ASGIReceiveCallable, send: ASGISendCallable
        ) -> None:
            upload = Upload(request.content_type)
            if not await feed_body(receive, upload.feed):
                return
            upload.finish()
            await self._generations.run(TranscriptionWork.of(upload, task), receive, send)

        return _Route("POST", handler, reads_body=False)

    def _health(self, request: Request) -> Answer:
        return (
            Answer(503, b'{"status":"loading"}')
            if self._loading
            else Answer(200, b'{"status":"ok"}')
        )

    def _slot_action(self, request: Request) -> bytes:
        slot = request.path.removeprefix(_SLOT_PREFIX)
        return slot_action_answer(self.options, slot, request.query)


def build_app(options: EchoOptions) -> EchoApp:
    """The echo server's ASGI application, for serving in-process or with ``serve``."""
    return EchoApp(options)
