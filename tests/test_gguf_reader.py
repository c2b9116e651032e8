"""Reading a GGUF's metadata (trioserve/memory/gguf_reader.py): the reader that overrides one
private method of the ``gguf`` library, compared with the library's own reader field by field."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from trioserve.memory.gguf_reader import MetadataReader

ARCH = "fakearch"
TOKENS, MERGES = 100, 30


def write_gguf(path: Path) -> Path:
    """A GGUF with a field of every shape the estimate reads: scalars, a string, numeric and
    boolean arrays, a vocabulary and BPE merges (string arrays), and tensors."""
    writer = gguf.GGUFWriter(str(path), ARCH)
    writer.add_name("a model")
    writer.add_context_length(1024)
    writer.add_block_count(4)
    writer.add_uint32(gguf.Keys.Attention.HEAD_COUNT.format(arch=ARCH), 4)
    writer.add_array(gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=ARCH), [2, 0, 1, 0])
    writer.add_array(
        gguf.Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=ARCH), [True, False, True, False]
    )
    writer.add_token_list([f"t{i}" for i in range(TOKENS)])
    writer.add_token_merges([f"t{i} t{i + 1}" for i in range(MERGES)])
    writer.add_tensor("a", np.zeros((3, 5), np.float16))
    writer.add_tensor("b", np.zeros((2, 34), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_metadata_reader_agrees_with_gguf_s_own_reader(tmp_path: Path) -> None:
    """MetadataReader overrides GGUFReader._get_field_parts (gguf 0.19) to step over the
    elements of string arrays; if this fails, that private method changed in the installed
    gguf: compare its new version with the override in trioserve/memory/gguf_reader.py."""
    path = write_gguf(tmp_path / "model.gguf")
    stock, ours = gguf.GGUFReader(path), MetadataReader(path)
    assert list(ours.fields) == list(stock.fields), "GGUFReader._get_field_parts changed"
    string_arrays = {}
    for key, field in stock.fields.items():
        mine = ours.fields[key]
        assert mine.types == field.types, f"{key}: GGUFReader._get_field_parts changed"
        if field.types[-1] == gguf.GGUFValueType.STRING and field.types[0] == (
            gguf.GGUFValueType.ARRAY
        ):
            # Contents stepped over; the length kept where the stock reader has it.
            assert int(mine.parts[4][0]) == len(field.data), f"{key}: _get_field_parts changed"
            string_arrays[key] = len(field.data)
        else:
            assert mine.contents() == field.contents(), f"{key}: _get_field_parts changed"
    assert string_arrays == {gguf.Keys.Tokenizer.LIST: TOKENS, gguf.Keys.Tokenizer.MERGES: MERGES}
    assert [(t.name, t.n_bytes, t.data_offset) for t in ours.tensors] == [
        (t.name, t.n_bytes, t.data_offset) for t in stock.tensors
    ], "GGUFReader's tensor layout changed"
