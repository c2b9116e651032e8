"""``/v1/audio/transcriptions`` and ``/v1/audio/translations``: a multipart/form-data upload
(``Upload``, read as it arrives) and the answer that tells what arrived. Pure: no I/O.

The form: ``file`` (any bytes; they are hashed as they arrive, never held), ``model``,
``response_format`` (``json``, the default: ``{"text"}``; ``text``: the text as text/plain;
``verbose_json``: with ``task``, ``language``, ``duration`` and one segment). The text is
``echo: received N bytes of audio (NAME), sha256 HEX16``, so that a test sees whether the whole
upload arrived unchanged; ``duration`` counts the bytes as 16 kHz 16-bit mono PCM.

The multipart framing is python-multipart's streaming parser (Starlette's; it comes with the
``mcp`` dependency). Not werkzeug's sans-I/O ``MultipartDecoder``: its 3.1.9 yields a stray
carriage return as data when a read of the body ends inside its closing boundary (the tests
feed bodies byte by byte).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from trioserve.backends.echo.request import RequestError
from trioserve.backends.echo.vocab import tokenize
from trioserve.backends.echo.wire import dumps, words
from trioserve.backends.echo.work import SSE_HEADERS, Answer

__all__ = ["Task", "TranscriptionWork", "Upload"]

Task = Literal["transcribe", "translate"]

# A form field's value (model, language, ...) is short; the file is never held.
_MAX_FIELD: Final = 64 * 1024
_FORMATS: Final = ("json", "text", "verbose_json")
_BYTES_PER_SECOND: Final = 32_000  # 16 kHz, 16-bit, mono


class Upload:
    """A multipart/form-data body, fed as it arrives: the file's size, name and digest, and the
    other fields' values."""

    def __init__(self, content_type: str) -> None:
        mimetype, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if mimetype != b"multipart/form-data" or not boundary:
            message = "The request must be multipart/form-data, with a boundary."
            raise RequestError(400, message, "invalid_content_type")
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_end": self._end,
            },
        )
        self._field = bytearray()  # the header being read: name, then value
        self._header_value_at = 0
        self._disposition = b""
        self._part: str | None = None
        self._value = bytearray()
        self._digest = hashlib.sha256()
        self._complete = False
        self.fields: dict[str, str] = {}
        self.filename: str | None = None  # None: no file part (yet)
        self.size = 0

    @property
    def sha256(self) -> str:
        """The hex digest of the file's bytes so far."""
        return self._digest.hexdigest()

    def feed(self, data: bytes) -> None:
        """The next piece of the body."""
        try:
            self._parser.write(data)
        except MultipartParseError as error:
            message = f"The multipart body is malformed: {error}"
            raise RequestError(400, message, "invalid_multipart") from error

    def finish(self) -> None:
        """The body is complete: a ``RequestError`` if it is cut short or has no file."""
        if not self._complete:
            message = "The multipart body is malformed: it ends before its closing boundary."
            raise RequestError(400, message, "invalid_multipart")
        if self.filename is None:
            raise RequestError(400, "The form has no 'file'.", "invalid_file")

    def _part_begin(self) -> None:
        self._part, self._disposition = None, b""
        self._value.clear()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]
        self._header_value_at = len(self._field)

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_end(self) -> None:
        name = bytes(self._field[: self._header_value_at])
        if name.strip().lower() == b"content-disposition":
            self._disposition = bytes(self._field[self._header_value_at :])
        self._field.clear()

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._disposition)
        self._part = params.get(b"name", b"").decode("utf-8", "replace")
        if self._part == "file":
            if self.filename is not None:
                raise RequestError(400, "The form has more than one 'file'.", "invalid_file")
            self.filename = params.get(b"filename", b"").decode("utf-8", "replace")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part == "file":
            self.size += end - start
            self._digest.update(memoryview(data)[start:end])  # no copy of the audio
            return
        self._value += data[start:end]
        if len(self._value) > _MAX_FIELD:
            message = f"The form field '{self._part}' is over {_MAX_FIELD} bytes."
            raise RequestError(413, message, "too_large")

    def _part_end(self) -> None:
        if self._part is not None and self._part != "file":
            self.fields[self._part] = self._value.decode("utf-8", "replace")

    def _end(self) -> None:
        self._complete = True


def _format(upload: Upload) -> str:
    chosen = upload.fields.get("response_format", "json")
    if chosen not in _FORMATS:
        message = f"'response_format' must be one of {', '.join(_FORMATS)}."
        raise RequestError(400, message, "invalid_response_format")
    return chosen


@dataclass(frozen=True, slots=True)
class TranscriptionWork:
    """A transcription or translation: never streamed, it takes a token per word of its text."""

    task: Task
    text: str
    response_format: str
    duration: float

    stream = False
    slow_start = False
    error_after = None
    stream_headers = SSE_HEADERS  # never used: not streamed

    @classmethod
    def of(cls, upload: Upload, task: Task) -> TranscriptionWork:
        """The work for a finished ``upload``; a ``RequestError`` for a bad ``response_format``."""
        text = (
            f"echo: received {upload.size} bytes of audio ({upload.filename}), "
            f"sha256 {upload.sha256[:16]}"
        )
        duration = round(upload.size / _BYTES_PER_SECOND, 3)
        return cls(task, text, _format(upload), duration)

    @property
    def tokens(self) -> int:
        return words(self.text)

    @property
    def usage(self) -> tuple[int, int]:
        return 0, words(self.text)

    def answer(self, number: int, created: int) -> Answer:
        if self.response_format == "text":
            return Answer(200, self.text.encode() + b"\n", b"text/plain; charset=utf-8")
        if self.response_format == "json":
            return Answer(200, dumps({"text": self.text}))
        segment = {
            "id": 0,
            "seek": 0,
            "start": 0.0,
            "end": self.duration,
            "text": self.text,
            "tokens": tokenize(self.text),
            "temperature": 0.0,
            "avg_logprob": -0.125,
            "compression_ratio": 1.0,
            "no_speech_prob": 0.0,
        }
        verbose = {
            "task": self.task,
            "language": "english",
            "duration": self.duration,
            "text": self.text,
            "segments": [segment],
        }
        return Answer(200, dumps(verbose))

    def chunks(self, number: int, created: int) -> tuple[Iterable[bytes], bytes]:
        return [], self.answer(number, created).body  # never called: not streamed
