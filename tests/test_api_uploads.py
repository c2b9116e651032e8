"""Uploads (``/v1/audio/transcriptions``, ``/v1/audio/translations``) through the daemon: a form
whose ``model`` comes after a multi-MB file arrives whole at the model (the echo names the byte
count and digest of what it received); ``max_upload_bytes`` bounds an upload, declared or
chunked, with 413 ``request_too_large`` before any of it reaches a model; ``max_body_bytes``
bounds JSON bodies and not uploads; an upload answered with an error while the client is still
sending gets its answer."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest

from tests.support.config import echo_config
from tests.support.daemon import running_daemon
from tests.support.http import RawConnection, assert_openai_error, chat, status_of
from tests.support.status import backend_stats, load_model, wait_for_stats

BOUNDARY = "api-upload-boundary"
FORM = f"multipart/form-data; boundary={BOUNDARY}"
LIMIT = 4 * 1024 * 1024  # max_upload_bytes here
AUDIO_SIZE = 3 * 1024 * 1024  # under it, and past the daemon's memory threshold (1 MiB)


def audio(size: int) -> bytes:
    return hashlib.shake_256(b"upload").digest(size)


def file_part(data: bytes, filename: str = "speech.wav") -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode() + data


def field(name: str, value: str) -> bytes:
    return (
        f'\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}'.encode()
    )


def form_with_model_last(data: bytes, model: str, **fields: str) -> bytes:
    """The file first, then the other ``fields``, then ``model``: the daemon must read the
    whole file before it knows where the upload goes."""
    tail = b"".join(field(name, value) for name, value in fields.items())
    return file_part(data) + tail + field("model", model) + f"\r\n--{BOUNDARY}--\r\n".encode()


def heard(data: bytes, filename: str = "speech.wav") -> str:
    """The echo's text for an upload of ``data``: every byte arrived, unchanged."""
    digest = hashlib.sha256(data).hexdigest()[:16]
    return f"echo: received {len(data)} bytes of audio ({filename}), sha256 {digest}"


async def test_a_multi_mb_upload_with_its_model_last_arrives_whole(state_dir: Path) -> None:
    # JSON bodies may not pass 4 KiB here; uploads have their own, larger, limit.
    config = echo_config(state_dir, server={"max_body_bytes": 4096, "max_upload_bytes": LIMIT})
    data = audio(AUDIO_SIZE)
    async with running_daemon(config, admin=True) as (_, client):
        port = (await load_model(client, "echo"))["port"]
        for path, task in (
            ("/v1/audio/transcriptions", "transcribe"),
            ("/v1/audio/translations", "translate"),
        ):
            body = form_with_model_last(data, "echo", response_format="verbose_json")
            answer = await client.post(path, content=body, headers={"content-type": FORM})
            assert answer.status_code == 200, answer.text[:500]
            assert (answer.json()["task"], answer.json()["text"]) == (task, heard(data))
        too_big = await client.post("/v1/chat/completions", json=chat(text="x " * 3000))
        assert_openai_error(too_big, 413, "request_too_large")
        # (Counted once the echo's last send returned: maybe a moment after the client read it.)
        stats = await wait_for_stats(port, "completed", 2)
        assert stats == {"started": 2, "completed": 2, "cancelled": 0}


async def test_an_upload_over_max_upload_bytes_is_413_and_reaches_no_model(
    state_dir: Path,
) -> None:
    config = echo_config(state_dir, server={"max_upload_bytes": 1024 * 1024})
    async with running_daemon(config, admin=True) as (info, client):
        port = (await load_model(client, "echo"))["port"]
        head = (
            f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Type: {FORM}\r\n"
        ).encode()
        # Declared: refused from its Content-Length, before a byte of the body is read.
        async with await RawConnection.open(info.url) as declared:
            length = 2 * 1024 * 1024
            assert await declared.send(head + f"Content-Length: {length}\r\n\r\n".encode())
            answer = await declared.read()
        assert status_of(answer) == 413, answer[:300]
        assert b'"code": "request_too_large"' in answer, answer
        # Chunked: refused once the limit is passed, the model not yet known (it comes last).
        async with await RawConnection.open(info.url) as chunked:
            assert await chunked.send(head + b"Transfer-Encoding: chunked\r\n\r\n")
            piece = audio(64 * 1024)
            for data in (file_part(b""), *[piece] * 32):  # 2 MiB in all
                if not await chunked.send(f"{len(data):x}\r\n".encode() + data + b"\r\n"):
                    break  # the daemon answered and closed: the rest is not wanted
            answer = await chunked.read()
        assert status_of(answer) == 413, answer[:300]
        assert b'"code": "request_too_large"' in answer, answer
        assert await backend_stats(port) == {"started": 0, "completed": 0, "cancelled": 0}


async def test_the_413_of_an_upload_names_max_upload_bytes(state_dir: Path) -> None:
    """The setting a user would have to change is ``max_upload_bytes``."""
    config = echo_config(state_dir, server={"max_upload_bytes": 1024 * 1024})
    async with running_daemon(config) as (_, client):
        body = form_with_model_last(audio(2 * 1024 * 1024), "echo")
        answer = await client.post(
            "/v1/audio/transcriptions", content=body, headers={"content-type": FORM}
        )
    error = assert_openai_error(answer, 413, "request_too_large")
    assert "max_upload_bytes" in error["message"], error


async def test_an_upload_answered_while_still_being_sent_gets_its_answer(state_dir: Path) -> None:
    """A client that sends its whole body before it reads (httpx, the OpenAI SDK) gets the
    504 of an upload whose model did not start within first_byte_timeout: the daemon stopped
    reading the upload while it waited for the model, so it must not leave the connection
    unread and open once it answered."""
    config = echo_config(state_dir, "--startup-delay", "5", server={"first_byte_timeout": 1})
    data = audio(8 * 1024 * 1024)  # more than the socket buffers and Hypercorn's queue hold
    async with running_daemon(config) as (_, client):
        try:
            answer = await client.post(
                "/v1/audio/transcriptions",
                files={"file": ("speech.wav", data, "audio/wav")},
                data={"model": "echo"},
                timeout=6,
            )
        except httpx.WriteTimeout:
            pytest.fail("the daemon answered neither by reading the upload nor by closing")
    error = assert_openai_error(answer, 504, "timeout")
    assert "first_byte_timeout" in error["message"], error
