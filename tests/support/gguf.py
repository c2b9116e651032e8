"""Tiny GGUF files written with the ``gguf`` library: a fake model whose metadata alone decides
an estimate (tests of trioserve/memory/gguf_estimate.py, and of configs refused for a model
whose estimate could never fit)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

__all__ = [
    "ARCH",
    "CTX_TRAIN",
    "EMBD",
    "F16_ROW",
    "FF",
    "HEAD",
    "HEADS",
    "KV_HEADS",
    "LAYERS",
    "VOCAB",
    "MiB",
    "write_gguf",
]

MiB = 2**20
ARCH = "fakearch"  # no architecture llama.cpp knows: nothing but the metadata decides
# The fake model: 4 layers, 4 query heads, 2 KV heads of 16 values each.
LAYERS, EMBD, HEADS, KV_HEADS, HEAD, FF, VOCAB, CTX_TRAIN = 4, 64, 4, 2, 16, 128, 100, 1024
# One f16 K or V row of one layer: 2 heads x 16 values x 2 bytes.
F16_ROW = KV_HEADS * HEAD * 2


def write_gguf(
    path: Path,
    *,
    arch: str = ARCH,
    meta: dict[str, Any] | None = None,
    tensors: dict[str, tuple[np.ndarray[Any, Any], gguf.GGMLQuantizationType | None]] | None = None,
    split_max_tensors: int = 0,
    tokens: int = VOCAB,
    merges: int = 0,
) -> Path:
    """A GGUF with the fake model's attention metadata, ``meta`` added (keys with ``{arch}``
    filled in; None removes a key), a vocabulary of ``tokens`` tokens and ``merges`` BPE
    merges, and ``tensors`` (default: one f32 tensor)."""
    fields: dict[str, Any] = {
        gguf.Keys.LLM.CONTEXT_LENGTH: CTX_TRAIN,
        gguf.Keys.LLM.EMBEDDING_LENGTH: EMBD,
        gguf.Keys.LLM.BLOCK_COUNT: LAYERS,
        gguf.Keys.LLM.FEED_FORWARD_LENGTH: FF,
        gguf.Keys.Attention.HEAD_COUNT: HEADS,
        gguf.Keys.Attention.HEAD_COUNT_KV: KV_HEADS,
        gguf.Keys.Attention.KEY_LENGTH: HEAD,
        gguf.Keys.Attention.VALUE_LENGTH: HEAD,
    }
    fields.update(meta or {})
    writer = gguf.GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
    for key, value in fields.items():
        if value is None:
            continue
        name = key.format(arch=arch)
        if isinstance(value, list):
            writer.add_array(name, value)
        elif isinstance(value, str):
            writer.add_string(name, value)
        else:
            writer.add_uint32(name, value)
    if tokens:
        writer.add_token_list([f"t{i}" for i in range(tokens)])
    if merges:
        writer.add_token_merges([f"t{i} t{i + 1}" for i in range(merges)])
    for name, (data, raw_dtype) in (tensors or {"w": (np.zeros(4, np.float32), None)}).items():
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
