"""Reading a GGUF's metadata fast, for the memory estimate (memory/gguf_estimate.py).

``gguf.GGUFReader`` builds one numpy view per element of every array field, the vocabulary's
tokens included: opening Gemma 3's GGUF, with its 262,144 tokens, took 9.7 s and brought the
process to 716 MiB, where ``MetadataReader`` below takes 0.04 s and a few MiB. It does so by
overriding one private method of the library, ``GGUFReader._get_field_parts``: this module is
the one place in trioserve that touches the library's internals. pyproject.toml pins
``gguf>=0.19,<0.20`` for it, and tests/test_gguf_reader.py compares this reader with the stock
one field by field, failing with the method's name when the library changes under it.

Besides the reader: opening a file with errors that name it, the parts of a split model, their
tensors' bytes, and typed look-ups of the metadata. Nothing here reads tensor data: the library
memory-maps the file.
"""

from __future__ import annotations

import re
import struct
import sys
from collections.abc import Sequence
from typing import Any

import gguf
import numpy as np
import numpy.typing as npt

__all__ = [
    "GgufEstimateError",
    "Metadata",
    "MetadataReader",
    "open_gguf",
    "part_paths",
    "tensor_bytes",
]


class GgufEstimateError(ValueError):
    """A command names a GGUF whose memory cannot be estimated: missing, unreadable, not a
    GGUF, or a command line llama-server would refuse."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot estimate the memory of {path}: {reason}")
        self.path = path
        self.reason = reason


class MetadataReader(gguf.GGUFReader):
    """``gguf.GGUFReader`` that does not build an object per element of array fields.

    Numeric arrays become one view each, and the contents of string arrays (the tokenizer's
    tokens and merges, which no estimate needs) are stepped over, leaving their length. This
    overrides one private method, ``_get_field_parts`` (gguf 0.19); see the module's docstring.
    """

    def _get_field_parts(
        self, orig_offs: int, raw_type: int
    ) -> tuple[int, list[npt.NDArray[Any]], list[int], list[gguf.GGUFValueType]]:
        if gguf.GGUFValueType(raw_type) != gguf.GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        item_type = self._get(orig_offs, np.uint32)
        length = self._get(orig_offs + 4, np.uint64)
        start = orig_offs + 12
        item = gguf.GGUFValueType(int(item_type[0]))
        types = [gguf.GGUFValueType.ARRAY, item]
        scalar = self.gguf_scalar_to_np.get(item)
        if scalar is not None:
            values = self._get(start, scalar, int(length[0]))
            if len(values) != int(length[0]):
                raise ValueError("an array runs past the end of the file")
            return start + int(values.nbytes) - orig_offs, [item_type, length, values], [2], types
        if item == gguf.GGUFValueType.STRING:
            end = _skip_strings(self.data, start, int(length[0]), self._length_format())
            return end - orig_offs, [item_type, length], [], types
        return super()._get_field_parts(orig_offs, raw_type)  # arrays of arrays: none seen

    def _length_format(self) -> str:
        native = "<" if sys.byteorder == "little" else ">"
        swapped = ">" if native == "<" else "<"
        return native + "Q" if self.byte_order == "I" else swapped + "Q"


def _skip_strings(data: npt.NDArray[Any], offset: int, count: int, length_format: str) -> int:
    """The offset just past ``count`` GGUF strings (a u64 length, then the bytes) at
    ``offset``. struct reads the lengths straight from the mapping: a numpy view per string
    costs microseconds, and vocabularies hold hundreds of thousands of strings."""
    unpack = struct.Struct(length_format).unpack_from
    buffer = data.data  # a memoryview of the mapping, no copy
    for _ in range(count):
        (length,) = unpack(buffer, offset)
        offset += 8 + length
    if offset > len(buffer):
        raise ValueError("a string array runs past the end of the file")
    return offset


# What a damaged file makes the reader raise, besides OSError for a missing or unreadable one.
_BAD_FILE = (ValueError, KeyError, IndexError, OverflowError, struct.error)


def open_gguf(path: str) -> MetadataReader:
    """The file's reader; GgufEstimateError naming the file when it is missing, unreadable or
    not a GGUF."""
    try:
        return MetadataReader(path)
    except FileNotFoundError:
        raise GgufEstimateError(path, "no such file") from None
    except OSError as error:
        raise GgufEstimateError(path, error.strerror or str(error)) from None
    except _BAD_FILE as error:
        raise GgufEstimateError(path, f"not a readable GGUF file ({error})") from None


# llama.cpp's split files: <prefix>-00001-of-00003.gguf (llama_split_path); the first part
# holds all the metadata, every part some of the tensors.
_SPLIT = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)


def part_paths(path: str) -> list[str]:
    """Every part of the model ``path`` names, the first first; ``[path]`` when not split."""
    match = _SPLIT.match(path)
    if match is None:
        return [path]
    count = int(match.group("count"))
    return [f"{match.group('prefix')}-{no:05d}-of-{count:05d}.gguf" for no in range(1, count + 1)]


def tensor_bytes(reader: gguf.GGUFReader) -> int:
    return sum(int(tensor.n_bytes) for tensor in reader.tensors)


class Metadata:
    """Typed look-ups of one GGUF's key/value fields."""

    def __init__(self, path: str, reader: gguf.GGUFReader) -> None:
        self.path = path
        self.reader = reader
        field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
        arch = None if field is None else field.contents()
        if not isinstance(arch, str):
            raise GgufEstimateError(path, "no general.architecture in its metadata")
        self.arch = arch

    def value(self, key: str) -> Any:
        """The field ``key`` (``{arch}`` filled in), None when absent."""
        field = self.reader.get_field(key.format(arch=self.arch))
        return None if field is None else field.contents()

    def integer(self, key: str, default: int) -> int:
        value = self.value(key)
        if value is None:
            return default
        if not isinstance(value, int):
            raise GgufEstimateError(self.path, f"{key.format(arch=self.arch)} is not a number")
        return value

    def per_layer(self, key: str, n_layer: int, default: Sequence[int]) -> list[int]:
        """A per-layer count: llama.cpp takes a scalar for all layers or an array of one each
        (get_key_or_arr)."""
        value = self.value(key)
        if value is None:
            return list(default)
        if isinstance(value, list):
            return [int(item) for item in value[:n_layer]] + [0] * (n_layer - len(value))
        return [int(value)] * n_layer

    def array_length(self, key: str) -> int:
        field = self.reader.get_field(key.format(arch=self.arch))
        if field is None or field.types[:1] != [gguf.GGUFValueType.ARRAY]:
            return 0
        return int(field.parts[4][0])  # key length, key, type, item type, length, ...
