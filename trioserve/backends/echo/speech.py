"""``/v1/audio/speech``: text in, audio out, streamed. Pure: no I/O.

The request: ``{"input", "voice"?, "response_format"?}`` (``wav``, the default; ``mp3``,
``opus``, ``aac``, ``flac``, ``pcm``). The answer is ``speech_audio(input, format)``: for wav a
valid header and 16 kHz 16-bit mono samples, 50 ms a character, of quiet noise drawn from the
input (so that a test can tell any byte out of place); the other formats are that noise after
their format's magic bytes, not real audio. It is streamed in ``CHUNKS`` chunks, one token delay
apart, without a Content-Length (chunked), as a server that encodes while it speaks.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from trioserve.backends.echo.options import EchoOptions
from trioserve.backends.echo.request import RequestError, parse_json
from trioserve.backends.echo.wire import words
from trioserve.backends.echo.work import Answer

__all__ = ["CHUNKS", "SpeechWork", "parse_speech", "speech_audio"]

CHUNKS: Final = 8
_RATE: Final = 16_000
_BYTES_PER_CHARACTER: Final = _RATE * 2 // 20  # 50 ms of 16-bit samples
# Content types and leading bytes of each format; only wav is audio a player would play.
_FORMATS: Final = {
    "wav": (b"audio/wav", b""),
    "mp3": (b"audio/mpeg", b"ID3\x04\x00\x00\x00\x00\x00\x00"),
    "opus": (b"audio/ogg", b"OggS"),
    "aac": (b"audio/aac", b"\xff\xf1"),
    "flac": (b"audio/flac", b"fLaC"),
    "pcm": (b"audio/pcm", b""),
}


def _wav_header(data_size: int) -> bytes:
    return (
        b"RIFF"
        + struct.pack("<I", 36 + data_size)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, _RATE, _RATE * 2, 2, 16)
        + b"data"
        + struct.pack("<I", data_size)
    )


def speech_audio(text: str, response_format: str = "wav") -> bytes:
    """The whole audio the echo speaks for ``text``, the same in every process."""
    size = _BYTES_PER_CHARACTER * len(text)
    samples = bytearray(size)
    # Each sample's low byte is noise, its high byte 0: audible as a faint hiss at most.
    samples[0::2] = hashlib.shake_256(text.encode()).digest(size // 2)
    if response_format == "wav":
        return _wav_header(size) + bytes(samples)
    return _FORMATS[response_format][1] + bytes(samples)


def parse_speech(body: bytes, options: EchoOptions) -> SpeechWork:
    """The request ``body`` as a ``Work``; a ``RequestError`` for a bad one."""
    payload = parse_json(body)
    text = payload.get("input")
    if not isinstance(text, str) or not text:
        raise RequestError(400, "'input' must be a non-empty string.", "invalid_input")
    response_format = payload.get("response_format", "wav")
    if response_format not in _FORMATS:
        message = f"'response_format' must be one of {', '.join(_FORMATS)}."
        raise RequestError(400, message, "invalid_response_format")
    return SpeechWork(text, response_format)


@dataclass(frozen=True, slots=True)
class SpeechWork:
    """A speech request: always streamed, ``CHUNKS`` chunks, a token delay before each."""

    text: str
    response_format: str

    stream = True
    # The client asked for a whole file: --response-delay holds back the head too.
    slow_start = True
    tokens = CHUNKS
    error_after = None

    @property
    def usage(self) -> tuple[int, int]:
        return words(self.text), CHUNKS

    @property
    def stream_headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"content-type", _FORMATS[self.response_format][0])]

    def answer(self, number: int, created: int) -> Answer:
        audio = speech_audio(self.text, self.response_format)
        return Answer(200, audio, _FORMATS[self.response_format][0])

    def chunks(self, number: int, created: int) -> tuple[Iterable[bytes], bytes]:
        audio = speech_audio(self.text, self.response_format)
        step = -(-len(audio) // CHUNKS)  # rounded up: never a ninth chunk
        return [audio[i : i + step] for i in range(0, len(audio), step)], b""
