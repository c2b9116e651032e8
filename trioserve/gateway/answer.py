"""The model's answer on its way to the client: streamed event by event, piped through as it
comes (binary audio, ``/upstream``), read whole, or assembled from the stream a non-streaming
request was turned into.

Each reads the upstream response one socket read at a time under ``stream_idle_timeout``
(``IdleDeadline``) and sets the request's usage, also when cut short (client gone, deadline,
crash): an answer cut short counts an estimate of what was generated until then.
"""

from __future__ import annotations

from trioserve.errors import RequestTimeout
from trioserve.gateway.assemble import Assembler
from trioserve.gateway.downstream import Headers
from trioserve.gateway.idle import IdleDeadline
from trioserve.gateway.request import RelayedRequest
from trioserve.gateway.upstream import UpstreamResponse
from trioserve.gateway.usage import StreamUsage

__all__ = ["assemble", "pipe", "read_whole", "stream"]


async def stream(
    request: RelayedRequest, response: UpstreamResponse, first: bytes, idle: float
) -> None:
    """Send what each upstream read brought, in one send, until the answer ends."""
    out = request.out
    chunk = first
    usage = StreamUsage(request.api.usage)
    ended = False
    try:
        with IdleDeadline(idle) as gap:
            while chunk:
                usage.feed(chunk)
                await out.send_body(chunk)
                # Time a slow client took is not the model's silence.
                gap.touch()
                chunk = await response.receive_some()
                gap.touch()
        ended = not gap.expired
    finally:
        # A complete answer counts its usage, or none when it had none. Only an answer cut
        # short (client gone, deadline, crash) counts an estimate of what was generated until
        # then (``StreamUsage.counted``).
        request.usage = usage.usage() if ended else usage.counted()
    if gap.expired:
        raise _stalled(request, idle)


async def pipe(
    request: RelayedRequest, response: UpstreamResponse, first: bytes, idle: float
) -> None:
    """Send the body through as it comes, whatever it is (audio, a model server's own
    pages): nothing in it is read, so nothing is counted."""
    out = request.out
    chunk = first
    with IdleDeadline(idle) as gap:
        while chunk:
            await out.send_body(chunk)
            gap.touch()
            chunk = await response.receive_some()
            gap.touch()
    if gap.expired:
        raise _stalled(request, idle)


async def read_whole(
    request: RelayedRequest, response: UpstreamResponse, first: bytes, idle: float
) -> bytes:
    """The whole answer, ``first`` and the rest of it: where an answer is collected."""
    parts = [first]
    with IdleDeadline(idle) as gap:
        async for chunk in response:
            parts.append(chunk)
            gap.touch()
    if gap.expired:
        raise _stalled(request, idle)
    return b"".join(parts)


async def assemble(
    request: RelayedRequest, response: UpstreamResponse, first: bytes, idle: float
) -> tuple[int, Headers, bytes]:
    """The non-streaming answer, assembled from the stream the request was turned into."""
    assert request.assemble is not None
    content_type = next(
        (
            value.decode("latin-1")
            for key, value in response.headers
            if key.lower() == b"content-type"
        ),
        "",
    )
    assembler = Assembler(request.assemble, response.status, content_type)
    chunk = first
    ended = False
    try:
        with IdleDeadline(idle) as gap:
            while chunk:
                assembler.feed(chunk)
                # Read on after the stream's end: a keep-alive connection goes back to the
                # pool only once its response has ended.
                chunk = await response.receive_some()
                gap.touch()
        ended = not gap.expired
    finally:
        # As a stream's: the usage, or none; an estimate only for an answer cut short before
        # its end (or error event).
        request.usage = assembler.tokens() if ended else assembler.counted()
    if gap.expired:
        raise _stalled(request, idle)
    answer = assembler.result()
    headers = [
        (b"content-type", answer.content_type),
        (b"content-length", str(len(answer.body)).encode()),
    ]
    return answer.status, headers, answer.body


def _stalled(request: RelayedRequest, idle: float) -> RequestTimeout:
    return RequestTimeout(
        f"model {request.model!r} sent nothing for stream_idle_timeout ({idle:g}s); the "
        "upstream request was aborted"
    )
