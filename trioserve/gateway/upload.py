"""Multipart uploads (/v1/audio/transcriptions, /v1/audio/translations) relayed as they arrive.

The relay routes by ``model``, and in a multipart form that is a field which may come after a
file of many MB. So the body is parsed only until that field is known; the bytes read so far
are kept (in memory up to a threshold, beyond it in an unlinked temporary file), and the upload
is then sent upstream as the client's exact bytes: what was kept, then the rest as it comes.
"""

from __future__ import annotations

import tempfile
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import IO

import trio
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from trioserve.errors import InvalidRequest, RequestTooLarge
from trioserve.gateway.asgi import Receive, Scope, header
from trioserve.gateway.request import ClientGone

__all__ = ["MEMORY_THRESHOLD", "Upload", "begin_upload"]

# Bytes of a body held in memory while its model is unknown; past it they go to the spool file,
# written in one thread call per threshold's worth, not one per chunk of the client's.
MEMORY_THRESHOLD = 1 << 20
# A model name is a short identifier; a longer field is not one (and is not held).
_MODEL_MAX = 256
# The spool is read back in blocks of this size: memory stays bounded while it is sent.
_READ_BLOCK = 256 << 10
# RFC 2046 5.1.1 says 1 to 70 characters; python-multipart accepts up to 256, and so do we.
_BOUNDARY_MAX = 256


class _Intake:
    """The client's body read from ``receive`` with the checks of ``read_body``, what was read
    kept for a replay (memory, then the spool file), and, as an async iterator, the replay
    followed by the rest of the body as it arrives."""

    def __init__(self, receive: Receive, declared: int | None, limit: int, memory: int) -> None:
        self._receive = receive
        self.declared = declared
        self._limit = limit
        self._memory = memory
        self.received = 0
        self.ended = False  # the client's last message is in
        self._held: deque[bytes] = deque()  # kept in memory: the bytes after the spool's
        self._held_size = 0
        self._spool: IO[bytes] | None = None
        self._closed = False

    async def read(self) -> bytes:
        """The client's next chunk (maybe empty)."""
        message = await self._receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk: bytes = message.get("body", b"")
        self.received += len(chunk)
        # The relay sends the declared length upstream: a body of another length would leave
        # the upstream connection mid-request or make it read the next request as this one.
        if self.declared is not None and self.received > self.declared:
            raise InvalidRequest("the body is longer than its Content-Length")
        if self.received > self._limit:
            raise RequestTooLarge(self._limit, "max_upload_bytes")
        if not message.get("more_body", False):
            self.ended = True
            if self.declared is not None and self.received < self.declared:
                raise InvalidRequest("the body is shorter than its Content-Length")
        return chunk

    async def keep(self, chunk: bytes) -> None:
        """Keep ``chunk`` for the replay; past the threshold, move what is held to the spool."""
        if not chunk:
            return  # the replay never yields an empty chunk
        self._held.append(chunk)
        self._held_size += len(chunk)
        if self._held_size > self._memory:
            if self._spool is None:
                # Private (0600) and unlinked at once (O_TMPFILE where it can): nothing is left
                # on disk once it is closed, or once the process dies.
                self._spool = await trio.to_thread.run_sync(tempfile.TemporaryFile)
            await trio.to_thread.run_sync(self._spool.writelines, self._held)
            self._held.clear()
            self._held_size = 0

    async def rewind(self) -> None:
        if self._spool is not None:
            await trio.to_thread.run_sync(self._spool.seek, 0)

    def __aiter__(self) -> _Intake:
        return self

    async def __anext__(self) -> bytes:
        if self._closed:
            raise RuntimeError("the upload is closed")
        if self._spool is not None:
            block = await trio.to_thread.run_sync(self._spool.read, _READ_BLOCK)
            if block:
                return block
            await self._close_spool()  # read back whole: its disk space is freed now
        if self._held:
            return self._held.popleft()
        while not self.ended:
            chunk = await self.read()
            if chunk:
                return chunk
        raise StopAsyncIteration

    async def _close_spool(self) -> None:
        spool, self._spool = self._spool, None
        if spool is not None:
            with trio.CancelScope(shield=True):  # bounded: one close(2)
                await trio.to_thread.run_sync(spool.close)

    async def aclose(self) -> None:
        self._closed = True
        self._held.clear()
        await self._close_spool()


class _ModelScan:
    """python-multipart's streaming parser, fed the body, watching for the ``model`` field. It
    keeps no buffer (a part's headers are bounded by its limits): what it holds stays small
    whatever the body. (Werkzeug's MultipartDecoder was not used: it leaks a delimiter's CR
    into a field's value for some chunk splits, pallets/werkzeug#3285.)"""

    def __init__(self, boundary: bytes) -> None:
        self._name, self._value = bytearray(), bytearray()  # of the part header being read
        self._disposition: dict[bytes, bytes] = {}  # of the part being read
        self._in_model = False
        self._model = bytearray()
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._disposition.clear,
                "on_header_field": lambda data, start, end: self._name.extend(data[start:end]),
                "on_header_value": lambda data, start, end: self._value.extend(data[start:end]),
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
            },
        )
        self.model: str | None = None

    def feed(self, data: bytes) -> str | None:
        """Parse ``data``; the model once its field is whole."""
        try:
            self._parser.write(data)
        except FormParserError as exc:
            if self.model is None:  # what follows the model is the model server's to judge
                raise InvalidRequest(f"malformed multipart body: {exc}") from None
        return self.model

    def _header_end(self) -> None:
        if self._name.lower() == b"content-disposition":
            self._disposition.update(parse_options_header(bytes(self._value))[1])
        self._name.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        self._in_model = self.model is None and self._disposition.get(b"name") == b"model"
        if self._in_model and b"filename" in self._disposition:
            raise InvalidRequest("the form field 'model' must be text, not a file")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_model:
            self._model.extend(data[start:end])
            if len(self._model) > _MODEL_MAX:
                raise InvalidRequest(f"the form field 'model' is over {_MODEL_MAX} bytes")

    def _part_end(self) -> None:
        if self._in_model:
            self._in_model = False
            try:
                self.model = self._model.decode()
            except UnicodeDecodeError:
                raise InvalidRequest("the form field 'model' is not UTF-8 text") from None


def _boundary(content_type: bytes) -> bytes:
    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary", b"")
    if kind != b"multipart/form-data" or not 0 < len(boundary) <= _BOUNDARY_MAX:
        raise InvalidRequest("the body must be multipart/form-data, with a boundary")
    return boundary


def _declared_length(scope: Scope, limit: int) -> int | None:
    declared = header(scope, b"content-length")
    if declared is None:
        return None
    if header(scope, b"transfer-encoding") is not None:
        # As read_body: two framings at once is how requests are smuggled (RFC 9112 6.3).
        raise InvalidRequest("both Content-Length and Transfer-Encoding are set")
    if not declared.isdigit():
        raise InvalidRequest("Content-Length is not a number")
    if int(declared) > limit:
        raise RequestTooLarge(limit, "max_upload_bytes")  # before reading: nothing of it is spooled
    return int(declared)


@dataclass(eq=False)
class Upload:
    """A multipart upload whose model is known, ready to be sent upstream; ``async with`` (or
    ``aclose``) frees its spool file."""

    model: str  # the form field "model"
    length: int  # of the whole body, in bytes
    content_type: bytes  # the client's Content-Type, boundary included: the body is unchanged
    _intake: _Intake = field(repr=False)
    _read: bool = field(default=False, repr=False)

    def chunks(self) -> AsyncIterator[bytes]:
        """The whole body from its first byte, once: what was kept, then the rest from the
        client as it comes. Exactly ``length`` bytes, or it raises ``ClientGone`` (the client
        left) or ``InvalidRequest`` (the body ended early). The end of the form is not parsed:
        it is the model server's to judge. An iterator, not an async generator: a caller that
        stops early leaves nothing to finalize."""
        if self._read:
            raise RuntimeError("an upload's chunks can be read once")
        self._read = True
        return self._intake

    async def aclose(self) -> None:
        await self._intake.aclose()

    async def __aenter__(self) -> Upload:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


async def begin_upload(
    scope: Scope, receive: Receive, limit: int, *, memory: int = MEMORY_THRESHOLD
) -> Upload:
    """Read the body until its ``model`` field is known; the upload, its length known.

    400 when the body is not multipart/form-data with a boundary, is malformed before the
    field, or has no text ``model`` of at most 256 UTF-8 bytes; 413 past ``limit`` (at once
    when the Content-Length says so). Without a Content-Length (chunked) the whole body is
    read and kept before returning, because the relay sends a Content-Length upstream. Memory
    held stays under ``memory`` plus a chunk; the rest is spooled. The deadline is the
    caller's (a cancel scope); on any error or cancellation the spool file is closed here.
    """
    content_type = header(scope, b"content-type") or b""
    scan = _ModelScan(_boundary(content_type))
    intake = _Intake(receive, _declared_length(scope, limit), limit, memory)
    try:
        model = None
        while model is None and not intake.ended:
            chunk = await intake.read()
            await intake.keep(chunk)
            model = scan.feed(chunk)
        if model is None:
            raise InvalidRequest("the form has no field 'model'")
        while intake.declared is None and not intake.ended:
            await intake.keep(await intake.read())
        await intake.rewind()
    except BaseException:
        await intake.aclose()
        raise
    length = intake.received if intake.declared is None else intake.declared
    return Upload(model, length, content_type, intake)
