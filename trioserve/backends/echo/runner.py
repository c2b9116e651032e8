"""The timing of every generated answer, whatever its API: ``--response-delay``,
``--token-delay``, ``--crash-after``, the client leaving, and the counters of ``/stats``.

An answer that is not streamed waits as long as all its tokens take, then is sent whole; a
streamed one sends its head at once and each chunk one token apart. Either stops the moment the
client goes away, and is then counted as cancelled.
"""

from __future__ import annotations

import os
import time

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable

from trioserve.backends.echo.asgi import DisconnectWatcher, start_json
from trioserve.backends.echo.options import EchoOptions, EchoStats
from trioserve.backends.echo.work import Work

__all__ = ["Generations"]


class Generations:
    """Runs the generations of one server; ``stats`` counts them by outcome."""

    def __init__(self, options: EchoOptions, stats: EchoStats) -> None:
        self.options = options
        self.stats = stats
        self._chunks_sent = 0  # by every stream together: what --crash-after counts

    async def run(self, work: Work, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        """Answer with ``work``, timed; counted as completed once its last byte is sent."""
        stats = self.stats
        stats.started += 1
        number = stats.started
        finished = False
        try:
            watcher = DisconnectWatcher(receive)
            last_body = b""
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watcher.run, nursery.cancel_scope)
                # An error before the stream (echo_error_after 0) is an HTTP status, as
                # llama-server answers when a streamed task fails before its first token.
                if work.stream and work.error_after != 0:
                    last_body = await self._stream(work, number, send)
                else:
                    last_body = await self._compute(work, number, send)
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
                stats.completed += 1
                prompt, predicted = work.usage
                stats.prompt_tokens += prompt
                stats.predicted_tokens += predicted
            else:
                stats.cancelled += 1

    async def _compute(self, work: Work, number: int, send: ASGISendCallable) -> bytes:
        """Sleeps as long as the whole generation takes, sends the head, returns the body."""
        options = self.options
        tokens = work.tokens
        if work.error_after is not None:
            tokens = min(tokens, work.error_after)
        delay = options.response_delay + options.token_delay * tokens
        if delay > 0:
            await trio.sleep(delay)
        answer = work.answer(number, int(time.time()))
        await start_json(send, answer.status, len(answer.body), answer.content_type)
        return answer.body

    async def _stream(self, work: Work, number: int, send: ASGISendCallable) -> bytes:
        """Sends the head and one chunk per token; returns the stream's end."""
        options = self.options
        if work.slow_start and options.response_delay > 0:
            await trio.sleep(options.response_delay)
        await send({"type": "http.response.start", "status": 200, "headers": work.stream_headers})
        chunks, end = work.chunks(number, int(time.time()))
        delay = options.token_delay
        crash_after = options.crash_after
        for chunk in chunks:
            if delay > 0:
                await trio.sleep(delay)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            self._chunks_sent += 1
            if crash_after is not None and self._chunks_sent >= crash_after:
                os._exit(1)  # abrupt on purpose: no cleanup, as a segfaulting llama-server
        return end
