"""The echo backend's audio APIs: an upload to transcribe arrives whole and unchanged (a
multipart body read as it arrives), and speech comes back streamed in chunks."""

from __future__ import annotations

import hashlib
import io
import wave
from pathlib import Path

import pytest
import trio

from tests.support.echo import echo_backend
from trioserve.backends.echo.request import RequestError
from trioserve.backends.echo.speech import CHUNKS, speech_audio
from trioserve.backends.echo.transcription import Upload

AUDIO_SIZE = 3 * 1024 * 1024
BIG_UPLOAD = 64 * 1024 * 1024


def audio(size: int) -> bytes:
    """``size`` bytes no two of which are likely the same at two places (a shifted or dropped
    piece changes the digest)."""
    return hashlib.shake_256(b"audio").digest(size)


def multipart(boundary: str, fields: dict[str, str], data: bytes, filename: str) -> bytes:
    """A multipart/form-data body: ``fields``, then ``data`` as the part ``file``."""
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()
    return b"".join(parts) + head + data + f"\r\n--{boundary}--\r\n".encode()


def received(data: bytes, filename: str) -> str:
    digest = hashlib.sha256(data).hexdigest()[:16]
    return f"echo: received {len(data)} bytes of audio ({filename}), sha256 {digest}"


@pytest.mark.parametrize("piece", [1, 7, 4096])
def test_upload_is_parsed_whatever_pieces_the_body_comes_in(piece: int) -> None:
    data = audio(10_000) + b"\r\n--notyet\r\n"  # bytes that look like a boundary, but are not
    body = multipart("notyet1", {"model": "whisper", "response_format": "text"}, data, "a.wav")
    upload = Upload("multipart/form-data; boundary=notyet1")
    for start in range(0, len(body), piece):
        upload.feed(body[start : start + piece])
    upload.finish()
    assert (upload.size, upload.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert upload.filename == "a.wav"
    assert upload.fields == {"model": "whisper", "response_format": "text"}


def test_upload_refuses_what_is_not_a_form_with_a_file() -> None:
    with pytest.raises(RequestError):
        Upload("application/json")
    no_file = Upload("multipart/form-data; boundary=b")
    no_file.feed(b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nx\r\n--b--\r\n')
    with pytest.raises(RequestError, match="no 'file'"):
        no_file.finish()
    cut = Upload("multipart/form-data; boundary=b")
    cut.feed(b'--b\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nabc')
    with pytest.raises(RequestError, match="malformed"):
        cut.finish()


async def test_transcription_receives_a_3mb_upload_unchanged() -> None:
    data = audio(AUDIO_SIZE)
    text = received(data, "speech.wav")
    async with echo_backend() as echo:
        files = {"file": ("speech.wav", data, "audio/wav")}
        answer = await echo.client.post(
            "/v1/audio/transcriptions", data={"model": "whisper"}, files=files
        )
        assert answer.json() == {"text": text}
        plain = await echo.client.post(
            "/v1/audio/transcriptions", data={"response_format": "text"}, files=files
        )
        assert plain.headers["content-type"].startswith("text/plain")
        assert plain.text == text + "\n"
        verbose = await echo.client.post(
            "/v1/audio/translations", data={"response_format": "verbose_json"}, files=files
        )
        details = verbose.json()
        assert (details["task"], details["text"]) == ("translate", text)
        assert details["duration"] == round(AUDIO_SIZE / 32_000, 3)
        assert details["segments"][0]["text"] == text
        # A transcription is a generation: counted as chat is.
        assert await echo.stats() == {"started": 3, "completed": 3, "cancelled": 0}


async def test_transcription_refuses_bad_uploads_in_llama_servers_shape() -> None:
    async with echo_backend() as echo:
        files = {"file": ("a.wav", b"RIFF", "audio/wav")}
        refusals = [
            await echo.client.post("/v1/audio/transcriptions", data={"model": "whisper"}),
            await echo.client.post("/v1/audio/transcriptions", json={"file": "a"}),
            await echo.client.post(
                "/v1/audio/transcriptions", data={"response_format": "srt"}, files=files
            ),
            await echo.client.post(
                "/v1/audio/transcriptions",
                content=b"--b\r\nnot a part head",
                headers={"content-type": "multipart/form-data; boundary=b"},
            ),
        ]
        for refusal in refusals:
            assert refusal.status_code == 400, refusal.text
            error = refusal.json()["error"]
            assert (error["code"], error["type"]) == (400, "invalid_request_error")
        assert await echo.stats() == {"started": 0, "completed": 0, "cancelled": 0}


async def test_speech_streams_its_audio_in_chunks_a_token_delay_apart() -> None:
    text, delay = "hello there", 0.1
    async with echo_backend("--token-delay", str(delay)) as echo:
        body = {"model": "tts", "input": text, "voice": "alloy"}
        arrivals: list[float] = []
        pieces: list[bytes] = []
        async with echo.client.stream("POST", "/v1/audio/speech", json=body) as response:
            assert response.headers["content-type"] == "audio/wav"
            assert "content-length" not in response.headers
            assert response.headers["transfer-encoding"] == "chunked"
            async for piece in response.aiter_raw():
                arrivals.append(trio.current_time())
                pieces.append(piece)
        sound = b"".join(pieces)
        assert sound == speech_audio(text)
        # Chunks a token delay apart reach the client apart.
        assert len(arrivals) == CHUNKS
        assert arrivals[-1] - arrivals[0] >= (CHUNKS - 1) * delay * 0.9
        with wave.open(io.BytesIO(sound)) as wav:
            assert (wav.getnchannels(), wav.getframerate(), wav.getsampwidth()) == (1, 16_000, 2)
            assert wav.getnframes() == 800 * len(text)  # 50 ms a character
        assert await echo.stats() == {"started": 1, "completed": 1, "cancelled": 0}


async def test_speech_in_other_formats_and_its_refusals() -> None:
    async with echo_backend() as echo:
        mp3 = await echo.client.post(
            "/v1/audio/speech", json={"input": "hi", "response_format": "mp3"}
        )
        assert mp3.headers["content-type"] == "audio/mpeg"
        assert mp3.content == speech_audio("hi", "mp3") and mp3.content.startswith(b"ID3")
        for bad in ({"input": ""}, {"input": "hi", "response_format": "midi"}, {}):
            refusal = await echo.client.post("/v1/audio/speech", json=bad)
            assert refusal.status_code == 400, refusal.text
            assert refusal.json()["error"]["code"] == 400
        assert await echo.stats() == {"started": 1, "completed": 1, "cancelled": 0}


def peak_memory(pid: int) -> int:
    """The most memory process ``pid`` ever held (its peak resident set), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


async def test_an_upload_is_hashed_as_it_arrives_never_held_whole() -> None:
    data = audio(BIG_UPLOAD)
    async with echo_backend() as echo:
        files = {"file": ("warm-up.wav", b"RIFF", "audio/wav")}
        await echo.client.post("/v1/audio/transcriptions", files=files)
        before = peak_memory(echo.process.pid)
        files = {"file": ("big.wav", data, "audio/wav")}
        answer = await echo.client.post("/v1/audio/transcriptions", files=files)
        assert answer.json() == {"text": received(data, "big.wav")}
        # Held whole, the upload alone would raise the peak by its size.
        assert peak_memory(echo.process.pid) - before < BIG_UPLOAD // 4
