"""Multipart uploads read until their ``model`` is known, kept (memory, then an unlinked spool
file) and replayed byte for byte: trioserve/gateway/upload.py, over a fake ASGI ``receive``."""

from __future__ import annotations

import hashlib
import os
import random
import stat
import tempfile
import threading
import tracemalloc
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

import httpx
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trioserve.errors import InvalidRequest, RequestTooLarge
from trioserve.gateway.asgi import Message, Scope
from trioserve.gateway.request import ClientGone
from trioserve.gateway.upload import MEMORY_THRESHOLD, Upload, begin_upload

BOUNDARY = b"b0undary-7f3a"
CONTENT_TYPE = b"multipart/form-data; boundary=" + BOUNDARY
CHUNK = 64 * 1024
LIMIT = 100 * 1024 * 1024
MB5 = 5 * 1000 * 1000


def form(*parts: tuple[str, bytes, str | None], boundary: bytes = BOUNDARY) -> bytes:
    """A multipart body, parts in the given order: (name, value, filename or None)."""
    body = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += b"--" + boundary + b"\r\nContent-Disposition: " + disposition.encode() + b"\r\n"
        if filename:
            body += b"Content-Type: audio/wav\r\n"
        body += b"\r\n" + value + b"\r\n"
    return body + b"--" + boundary + b"--\r\n"


def audio(size: int) -> bytes:
    # Random bytes: a file with \r, \n and "--" in it, as real audio has.
    return random.Random(size).randbytes(size)


class FakeClient:
    """An ASGI ``receive`` over a body cut at ``splits``; each chunk a fresh bytes object (as
    Hypercorn's are), so that what the reader keeps shows in tracemalloc."""

    def __init__(
        self, body: bytes, splits: list[int] | None = None, *, end: str = "complete"
    ) -> None:
        cuts = sorted(set(splits if splits is not None else range(CHUNK, len(body), CHUNK)))
        self.bounds = list(zip([0, *cuts], [*cuts, len(body)], strict=True))
        self.body = body
        self.end = end  # "complete" | "disconnect" (after the chunks) | "hang"
        self.taken = 0
        self.hanging = trio.Event()

    async def receive(self) -> Message:
        await trio.lowlevel.checkpoint()
        self.taken += 1
        if self.taken <= len(self.bounds):
            start, stop = self.bounds[self.taken - 1]
            last = self.taken == len(self.bounds) and self.end == "complete"
            return {"type": "http.request", "body": self.body[start:stop], "more_body": not last}
        if self.end == "hang":
            self.hanging.set()
            await trio.sleep_forever()
        assert self.end == "disconnect", "read past the end of the body"
        return {"type": "http.disconnect"}


def scope(length: int | None, content_type: bytes = CONTENT_TYPE) -> Scope:
    headers = [(b"content-type", content_type)]
    if length is None:
        headers.append((b"transfer-encoding", b"chunked"))
    else:
        headers.append((b"content-length", str(length).encode()))
    return {"type": "http", "headers": headers}


async def replay(upload: Upload) -> bytes:
    return b"".join([chunk async for chunk in upload.chunks()])


def spool_fds(directory: Path) -> list[int]:
    """This process's open files in ``directory`` (an unlinked file keeps its directory in
    /proc's link, with " (deleted)")."""
    fds = []
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith(str(directory)):
            fds.append(int(name))
    return fds


@pytest.fixture
def spool_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


async def test_model_before_the_file_returns_after_its_first_chunk(spool_dir: Path) -> None:
    # As the OpenAI SDK sends it (httpx: fields before files).
    request = httpx.Request(
        "POST",
        "http://trioserve/v1/audio/transcriptions",
        data={"model": "whisper-1"},
        files={"file": ("speech.wav", audio(MB5), "audio/wav")},
    )
    body = request.read()
    content_type = request.headers["content-type"].encode()
    client = FakeClient(body)
    upload = await begin_upload(scope(len(body), content_type), client.receive, LIMIT)
    async with upload:
        assert (upload.model, upload.length, upload.content_type) == (
            "whisper-1",
            len(body),
            content_type,
        )
        assert client.taken == 1
        assert spool_fds(spool_dir) == []
        assert await replay(upload) == body
    assert client.taken == len(client.bounds)


async def test_model_after_a_big_file_is_spooled_to_a_private_unlinked_file(
    spool_dir: Path,
) -> None:
    body = form(("file", audio(MB5), "speech.wav"), ("model", b"whisper-1", None))
    client = FakeClient(body)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        upload = await begin_upload(scope(len(body)), client.receive, LIMIT)
        read_peak = tracemalloc.get_traced_memory()[1] - base
        assert upload.model == "whisper-1"
        [fd] = spool_fds(spool_dir)
        assert os.listdir(spool_dir) == []  # no name on disk
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o600
        digest, size = hashlib.sha256(), 0
        tracemalloc.reset_peak()
        async for chunk in upload.chunks():
            digest.update(chunk)
            size += len(chunk)
        replay_peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    await upload.aclose()
    # Held whole, the body would be 5 MB: the reader keeps the threshold and a few chunks.
    assert read_peak < MEMORY_THRESHOLD + 8 * CHUNK
    assert replay_peak < MEMORY_THRESHOLD + 8 * CHUNK
    assert (size, digest.digest()) == (len(body), hashlib.sha256(body).digest())
    assert spool_fds(spool_dir) == []


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    file=st.binary(max_size=600),
    model=st.text(min_size=1, max_size=20),
    model_first=st.booleans(),
    memory=st.sampled_from([16, 100, MEMORY_THRESHOLD]),
    chunked=st.booleans(),
    data=st.data(),
)
async def test_any_split_of_the_body_gives_the_same_model_and_bytes(
    file: bytes, model: str, model_first: bool, memory: int, chunked: bool, data: st.DataObject
) -> None:
    parts = [("file", file, "a.wav"), ("model", model.encode(), None)]
    body = form(*(parts[::-1] if model_first else parts))
    splits = data.draw(st.lists(st.integers(0, len(body)), max_size=12), label="splits")
    client = FakeClient(body, splits)
    length = None if chunked else len(body)
    async with await begin_upload(scope(length), client.receive, LIMIT, memory=memory) as upload:
        assert (upload.model, upload.length) == (model, len(body))
        assert await replay(upload) == body


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=400), splits=st.lists(st.integers(0, 400), max_size=5))
async def test_garbage_bodies_are_refused_as_invalid_requests(
    body: bytes, splits: list[int]
) -> None:
    client = FakeClient(body, [s for s in splits if s <= len(body)])
    with pytest.raises(InvalidRequest):
        await begin_upload(scope(len(body)), client.receive, LIMIT, memory=64)


async def test_no_content_length_reads_the_whole_body_to_know_its_length() -> None:
    body = form(("model", b"whisper-1", None), ("file", audio(300_000), "a.wav"))
    client = FakeClient(body)
    async with await begin_upload(scope(None), client.receive, LIMIT) as upload:
        assert client.taken == len(client.bounds) > 1
        assert upload.length == len(body)
        assert await replay(upload) == body


async def test_declared_length_over_the_limit_is_refused_before_reading() -> None:
    client = FakeClient(form(("model", b"m", None)))
    with pytest.raises(RequestTooLarge):
        await begin_upload(scope(1001), client.receive, 1000)
    assert client.taken == 0


@pytest.mark.parametrize("model_first", [True, False])
async def test_chunked_body_over_the_limit_is_refused_mid_stream(
    spool_dir: Path, model_first: bool
) -> None:
    parts = [("file", audio(3 * MEMORY_THRESHOLD), "a.wav"), ("model", b"m", None)]
    body = form(*(parts[::-1] if model_first else parts))
    client = FakeClient(body)
    with pytest.raises(RequestTooLarge):
        await begin_upload(scope(None), client.receive, 2 * MEMORY_THRESHOLD)
    assert client.taken < len(client.bounds)
    assert spool_fds(spool_dir) == []


async def test_disconnect_while_looking_for_the_model_is_client_gone(spool_dir: Path) -> None:
    body = form(("file", audio(MB5), "a.wav"), ("model", b"m", None))
    client = FakeClient(body[: 2 * MEMORY_THRESHOLD], end="disconnect")
    with pytest.raises(ClientGone):
        await begin_upload(scope(len(body)), client.receive, LIMIT)
    assert spool_fds(spool_dir) == []


async def test_disconnect_during_the_replay_is_client_gone() -> None:
    body = form(("model", b"m", None), ("file", audio(MB5), "a.wav"))
    client = FakeClient(body[: MB5 // 2], end="disconnect")
    async with await begin_upload(scope(len(body)), client.receive, LIMIT) as upload:
        with pytest.raises(ClientGone):
            await replay(upload)


@pytest.mark.parametrize("cut", ["short", "long"])
async def test_body_of_another_length_than_declared_is_invalid(cut: str) -> None:
    body = form(("model", b"m", None), ("file", audio(200_000), "a.wav"))
    declared = len(body) + 1 if cut == "short" else len(body) - 1
    client = FakeClient(body)
    async with await begin_upload(scope(declared), client.receive, LIMIT) as upload:
        with pytest.raises(InvalidRequest, match=cut + "er than its Content-Length"):
            await replay(upload)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (form(("file", audio(1000), "a.wav"), ("language", b"en", None)), "no field 'model'"),
        (form(("model", b"w" * 257, None)), "over 256 bytes"),
        (form(("model", b"\xff\xfe", None)), "not UTF-8"),
        (form(("model", b"whisper-1", "model.txt")), "not a file"),
        (form(("file", audio(1000), "a.wav"), ("model", b"m", None))[:-30], "no field 'model'"),
        (b"x" * 200_000, "malformed multipart body"),
        (form(("model", b"m", None), boundary=b"other"), "malformed multipart body"),
    ],
    ids=["missing", "too-long", "not-utf8", "a-file", "cut-short", "garbage", "other-boundary"],
)
async def test_forms_without_a_usable_model_are_invalid(body: bytes, message: str) -> None:
    client = FakeClient(body)
    with pytest.raises(InvalidRequest, match=message):
        await begin_upload(scope(len(body)), client.receive, LIMIT)
    if message == "malformed multipart body":
        assert client.taken == 1  # refused at once, not read whole


@pytest.mark.parametrize(
    "content_type",
    [b"application/json", b"multipart/form-data", b"multipart/form-data; boundary=", b""],
)
async def test_body_that_is_not_multipart_with_a_boundary_is_invalid(content_type: bytes) -> None:
    body = form(("model", b"m", None))
    client = FakeClient(body)
    with pytest.raises(InvalidRequest, match="multipart/form-data"):
        await begin_upload(scope(len(body), content_type), client.receive, LIMIT)
    assert client.taken == 0


async def test_both_content_length_and_transfer_encoding_are_invalid() -> None:
    body = form(("model", b"m", None))
    request_scope = scope(len(body))
    request_scope["headers"].append((b"transfer-encoding", b"chunked"))
    with pytest.raises(InvalidRequest, match="Transfer-Encoding"):
        await begin_upload(request_scope, FakeClient(body).receive, LIMIT)


async def test_cancelled_read_leaves_no_spool_file(spool_dir: Path) -> None:
    body = form(("file", audio(MB5), "a.wav"), ("model", b"m", None))
    client = FakeClient(body[: 3 * MEMORY_THRESHOLD], end="hang")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(begin_upload, scope(len(body)), client.receive, LIMIT)
        await client.hanging.wait()
        assert len(spool_fds(spool_dir)) == 1
        nursery.cancel_scope.cancel()
    assert spool_fds(spool_dir) == []


class GatedSpool:
    """A spool file whose first write, in its thread, waits until the test lets it go."""

    def __init__(self, make: Callable[[], IO[bytes]]) -> None:
        self._make = make
        self.file: IO[bytes] | None = None
        self.writing = threading.Event()
        self.go = threading.Event()

    def open(self) -> GatedSpool:
        self.file = self._make()
        return self

    def writelines(self, lines: Iterable[bytes]) -> None:
        assert self.file is not None
        self.writing.set()
        assert self.go.wait(10)
        self.file.writelines(lines)

    def close(self) -> None:
        assert self.file is not None
        self.file.close()


async def test_read_cancelled_during_a_spool_write_leaves_no_spool_file(
    spool_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = GatedSpool(tempfile.TemporaryFile)
    monkeypatch.setattr(tempfile, "TemporaryFile", gate.open)
    body = form(("file", audio(MB5), "a.wav"), ("model", b"m", None))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(begin_upload, scope(len(body)), FakeClient(body).receive, LIMIT)
        assert await trio.to_thread.run_sync(gate.writing.wait, 10)
        assert len(spool_fds(spool_dir)) == 1
        nursery.cancel_scope.cancel()  # takes effect once the write is done
        gate.go.set()
    assert spool_fds(spool_dir) == []


async def test_aclose_removes_the_spool_file(spool_dir: Path) -> None:
    body = form(("file", audio(MB5), "a.wav"), ("model", b"m", None))
    upload = await begin_upload(scope(len(body)), FakeClient(body).receive, LIMIT)
    assert len(spool_fds(spool_dir)) == 1
    await upload.aclose()
    assert spool_fds(spool_dir) == []
    with pytest.raises(RuntimeError, match="closed"):
        await upload.chunks().__anext__()


async def test_the_spool_is_closed_once_read_back(spool_dir: Path) -> None:
    body = form(("file", audio(MB5), "a.wav"), ("model", b"m", None), ("x", audio(MB5), "b"))
    client = FakeClient(body[: MB5 + CHUNK], end="hang")
    upload = await begin_upload(scope(len(body)), client.receive, LIMIT)
    async with upload, trio.open_nursery() as nursery:
        nursery.start_soon(replay, upload)
        await client.hanging.wait()  # replayed what was kept, now waiting for the client
        assert spool_fds(spool_dir) == []
        nursery.cancel_scope.cancel()


async def test_chunks_can_be_read_once() -> None:
    body = form(("model", b"m", None))
    async with await begin_upload(scope(len(body)), FakeClient(body).receive, LIMIT) as upload:
        assert await replay(upload) == body
        with pytest.raises(RuntimeError, match="once"):
            upload.chunks()
