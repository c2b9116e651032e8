"""Loading progress: SSE comments to a streaming client while its model starts or its request
waits for a slot, so the client can show progress and no proxy times it out. Anthropic's
streams get its own keep-alive, ``event: ping``, which its SDK expects and skips (a comment
would do for the SDK, but Anthropic's API sends pings, and clients may show them)."""

from __future__ import annotations

import trio

from trioserve.gateway.request import RelayedRequest
from trioserve.supervision.lifecycle import State
from trioserve.supervision.supervisor import Supervisor

__all__ = ["PROGRESS_AFTER", "PROGRESS_EVERY", "SSE_HEADERS", "send_progress"]

# After this long without an answer, a streaming client starts getting progress comments.
PROGRESS_AFTER = 1.0
PROGRESS_EVERY = 1.0
# Streamed responses end their connection: with Hypercorn 0.18, a client that closes a
# keep-alive connection after a chunked response leaves the socket in CLOSE_WAIT until the
# keep-alive timer. A stream is long next to one loopback TCP handshake.
CLOSE = (b"connection", b"close")
SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    # Tell nginx and friends not to buffer the stream.
    (b"x-accel-buffering", b"no"),
    CLOSE,
]
_PING = b'event: ping\ndata: {"type": "ping"}\n\n'


async def send_progress(request: RelayedRequest, supervisor: Supervisor) -> None:
    """From ``PROGRESS_AFTER`` on, one comment per ``PROGRESS_EVERY`` until
    ``request.answering`` is set; the first one starts a 200 SSE response."""
    stop = request.answering
    with trio.move_on_after(PROGRESS_AFTER):
        await stop.wait()
    out = request.out
    name = request.model
    while not stop.is_set():
        waited = trio.current_time() - request.start_clock
        model = supervisor.models.get(name)  # None: a reload removed it; it still serves
        if model is not None and model.waiting_for is not None:
            # e.g. ": waiting for memory: needs 6.0 GiB on cuda:0, 2.1 GiB free, held by
            # qwen (busy) (3.0s)"
            line = f": {model.waiting_for} ({waited:.1f}s)\n\n"
        elif model is None or model.state is State.READY:
            line = f": waiting for model {name} ({waited:.1f}s)\n\n"
        elif model.state is State.STOPPING:
            # It yielded its memory, or a reload replaces it: the request waits for its next
            # process, which is not loading yet.
            line = f": waiting for model {name}'s next turn ({waited:.1f}s)\n\n"
        else:
            line = f": loading model {name} ({waited:.1f}s)\n\n"
        if not out.started:
            await out.start(200, SSE_HEADERS)
        out.write(_PING if out.anthropic else line.encode())
        await out.flush()
        with trio.move_on_after(PROGRESS_EVERY):
            await stop.wait()
