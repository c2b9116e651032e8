"""How much memory a llama-server command will need, known before its first start.

Placement (issue 25) must decide whether a model fits before starting it, because a start that
runs out of memory fails only after a long load. For a command that serves a ``.gguf``, the
file's metadata is enough: the tensors' sizes give the weights, the attention shape and the
command line's context, slots and cache types give the KV cache, the micro-batch gives an
approximation of the compute buffers, and the vocabulary's size and the tensors the CPU backend
repacks give the process's own memory beyond those buffers. The arithmetic follows llama.cpp
build b11434 (the one ``scripts/real-model.sh`` builds); the places it copies are named where
they are used, so a reader can check them against a newer build.

What it leaves out, because the metadata cannot say or llama-server only grows it later: a
multimodal projector (``--mmproj``) or draft model (``-md``), the recurrent state of hybrid and
recurrent models, MLA's smaller cache (counted as full K and V), Gemma 3n's layers that share
another's cache (counted as their own), prompt-cache and context-checkpoint memory that grows
while serving (``--cache-ram``, ``--ctx-checkpoints``), and context that ``--fit`` shrinks to
fit free memory. The measured figure replaces the estimate once the model has run.

Reading is metadata only, through memory/gguf_reader.py: the ``gguf`` library memory-maps the file
and no tensor data is read.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from trioserve.memory.gguf_reader import (
    GgufEstimateError,
    Metadata,
    open_gguf,
    part_paths,
    tensor_bytes,
)
from trioserve.sizes import format_size

__all__ = ["GgufEstimate", "GgufEstimateError", "estimate_command", "gguf_path"]


@dataclass(frozen=True)
class GgufEstimate:
    """The memory a llama-server command will need, in bytes, from its GGUF's metadata."""

    path: str  # the .gguf file read (the first part of a split model)
    weights: int  # bytes of all tensors, over all parts
    kv_cache: int  # bytes of the KV cache for the command's context, slots and cache types
    # The compute buffer llama.cpp reserves for one micro-batch plus the logits output buffer;
    # an approximation, see _compute_bytes.
    compute: int
    # The process's own memory beyond those buffers: binary and libraries, the vocabulary's
    # tables, and weights the CPU backend repacks into a second copy; see _host_bytes.
    host: int
    context: int = 0  # total context in tokens over all slots, as llama.cpp rounds it
    slots: int = 1
    cache_types: str = "f16"  # "f16", or "q8_0/q4_0" when K and V differ

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.host

    def describe(self) -> str:
        """One line for logs and the status: what the total is made of."""
        slots = f" in {self.slots} slots" if self.slots != 1 else ""
        return (
            f"{Path(self.path).name}: weights {format_size(self.weights)}"
            f" + KV {format_size(self.kv_cache)} (ctx {self.context}{slots}, {self.cache_types})"
            f" + compute {format_size(self.compute)} + host {format_size(self.host)}"
        )


# --- The command line ----------------------------------------------------------------------

_MODEL_FLAGS = ("-m", "--model")
_GGUF_SUFFIX = ".gguf"


def gguf_path(argv: Sequence[str]) -> str | None:
    """The model file a command serves: the value of -m/--model (also --model=X form), else the
    first argument ending in .gguf; None when none."""
    # Only a value ending in .gguf counts as -m's: `python -m package` names a module, and a
    # command whose model file is not a .gguf has no estimate (it is measured instead).
    values = _model_values(argv)
    for candidate in (*values, *argv):
        if candidate.lower().endswith(_GGUF_SUFFIX):
            return candidate
    return None


def _model_values(argv: Sequence[str]) -> list[str]:
    values = []
    for index, arg in enumerate(argv):
        if arg in _MODEL_FLAGS and index + 1 < len(argv):
            values.append(argv[index + 1])
        elif arg.startswith("--model="):
            values.append(arg.removeprefix("--model="))
    return values


# llama-server's options that change memory (common/arg.cpp), each alias to one name. Options
# that take no value are listed apart; every other one takes the next argument.
_OPTIONS = {
    "-c": "ctx",
    "--ctx-size": "ctx",
    "-np": "parallel",
    "--parallel": "parallel",
    "-b": "batch",
    "--batch-size": "batch",
    "-ub": "ubatch",
    "--ubatch-size": "ubatch",
    "-ctk": "type_k",
    "--cache-type-k": "type_k",
    "-ctv": "type_v",
    "--cache-type-v": "type_v",
    "-fa": "flash_attn",
    "--flash-attn": "flash_attn",
    "-fit": "fit",
    "--fit": "fit",
    "--kv-unified-per-slot": "per_slot",
    "-lm": "load_mode",
    "--load-mode": "load_mode",
}
_FLAGS = {
    "--swa-full": ("swa_full", True),
    "-kvu": ("kv_unified", True),
    "--kv-unified": ("kv_unified", True),
    "-no-kvu": ("kv_unified", False),
    "--no-kv-unified": ("kv_unified", False),
    "--repack": ("repack", True),
    "-nr": ("repack", False),
    "--no-repack": ("repack", False),
}
# common/common.h's defaults; -np's default is -1 ("auto") in llama-server (common/arg.cpp).
_DEFAULT_BATCH = 2048
_DEFAULT_UBATCH = 512
_DEFAULT_CACHE_TYPE = "f16"
_AUTO_SLOTS = 4  # tools/server/server.cpp: -np auto means 4 slots sharing a unified cache
_OFF = frozenset({"off", "0", "false", "disabled", "no"})


@dataclass(frozen=True)
class _Args:
    """What the command line says about memory, llama-server's defaults where it says nothing
    (``ctx`` None: no -c, which differs from -c 0 for --kv-unified-per-slot)."""

    ctx: int | None = None
    parallel: int = -1
    batch: int = _DEFAULT_BATCH
    ubatch: int = _DEFAULT_UBATCH
    type_k: str = _DEFAULT_CACHE_TYPE
    type_v: str = _DEFAULT_CACHE_TYPE
    flash_attn: bool = True  # "auto" enables it wherever the backend has it, as on the CPU
    fit: bool = True
    per_slot: int = 0
    swa_full: bool = False
    kv_unified: bool = False
    repack: bool = True
    load_mode: str = "auto"  # "auto" maps the file wherever the device can, as the CPU can


def _parse_args(path: str, argv: Sequence[str]) -> _Args:
    # llama.cpp spells long options with '_' or '-' alike, and the last occurrence wins.
    found: dict[str, Any] = {}
    index = 0
    while index < len(argv):
        arg, value = argv[index], None
        if arg.startswith("--"):
            if "=" in arg:  # not llama.cpp's syntax, but argparse-style servers take it
                arg, value = arg.split("=", 1)
            arg = arg.replace("_", "-")
        index += 1
        if arg in _FLAGS:
            name, flag = _FLAGS[arg]
            found[name] = flag
        elif arg in _OPTIONS:
            if value is None:
                if index >= len(argv):
                    raise GgufEstimateError(path, f"{arg} has no value")
                value = argv[index]
                index += 1
            found[_OPTIONS[arg]] = _option_value(path, arg, _OPTIONS[arg], value)
    return _Args(**found)


def _option_value(path: str, arg: str, name: str, value: str) -> Any:
    if name in ("type_k", "type_v", "load_mode"):
        return value.lower()
    if name in ("flash_attn", "fit"):
        return value.lower() not in _OFF
    try:
        return int(value)
    except ValueError:
        raise GgufEstimateError(path, f"{arg} {value!r} is not a whole number") from None


# --- The model's shape ---------------------------------------------------------------------

# Architectures whose sliding-window layers llama.cpp lays out by a pattern when the GGUF gives
# none: (n, dense_first) as each src/models/<arch>.cpp passes it to load_swa_pattern. With
# dense_first, layer il is global when il % n == 0; otherwise when il % n == n - 1 (Gemma 3:
# every 6th layer, 5, 11, 17, ... keeps the whole context, the others only the window). A
# `{arch}.attention.sliding_window_pattern` in the GGUF wins: an array of per-layer booleans
# (Gemma 4, ...) or the n. Phi-3 is absent on purpose: llama.cpp disables its window. An
# architecture not listed here with no pattern in its GGUF counts every layer as global: too
# much rather than too little.
_SWA_PATTERNS = {
    "gemma2": (2, False),
    "gemma3": (6, False),
    "gemma3n": (5, False),
    "gpt-oss": (2, False),
    "cohere2": (4, False),
    "cohere2moe": (4, True),
    "olmo2": (4, False),
    "llama4": (4, False),  # chunked attention; llama.cpp sizes its cache the same way
    "exaone4": (4, False),
    "exaone-moe": (4, False),
    "afmoe": (4, False),
    "smallthinker": (4, True),
    "laguna": (4, True),
    "mellum": (4, False),
    "plamo3": (8, False),
    "muse-glimmer": (4, False),
}
# Encoders and diffusion models: llama.cpp creates no KV cache for them (create_memory).
_NO_KV_CACHE = frozenset(
    {
        "bert",
        "jina-bert-v2",
        "jina-bert-v3",
        "nomic-bert",
        "nomic-bert-moe",
        "neo-bert",
        "eurobert",
        "wavtokenizer-dec",
        "modern-bert",
        "gemma-embedding",
        "dream",
        "llada",
        "llada-moe",
        "rnd1",
        "clef",
    }
)


@dataclass(frozen=True)
class _Layer:
    kv_heads: int
    key_length: int  # per head
    value_length: int
    swa: bool


@dataclass(frozen=True)
class _Model:
    arch: str
    ctx_train: int
    n_embd: int
    n_ff: int  # the widest feed-forward activation of one token (experts in use included)
    n_head: int  # the most query heads of any layer
    n_vocab: int
    window: int  # sliding window in tokens; 0 when no layer slides
    layers: tuple[_Layer, ...]  # the layers that keep a KV cache


def _model(meta: Metadata) -> _Model:
    # src/llama-model.cpp load_hparams: counts per layer, heads defaulting as llama.cpp does.
    keys, attention = gguf.Keys.LLM, gguf.Keys.Attention
    n_layer_all = meta.integer(keys.BLOCK_COUNT, 0)
    n_embd = meta.integer(keys.EMBEDDING_LENGTH, 0)
    n_head = meta.per_layer(attention.HEAD_COUNT, n_layer_all, [0] * n_layer_all)
    most_heads = max(n_head, default=0)
    kv_heads = meta.per_layer(attention.HEAD_COUNT_KV, n_layer_all, n_head)
    head = n_embd // most_heads if most_heads else 0
    full = (meta.integer(attention.KEY_LENGTH, head), meta.integer(attention.VALUE_LENGTH, head))
    sliding = (
        meta.integer(attention.KEY_LENGTH_SWA, full[0]),
        meta.integer(attention.VALUE_LENGTH_SWA, full[1]),
    )
    # Multi-token-prediction layers at the end get no KV cache in the main context.
    n_layer = max(0, n_layer_all - meta.integer(keys.NEXTN_PREDICT_LAYERS, 0))
    window, swa = _sliding_window(meta, n_layer)
    layers = tuple(
        _Layer(kv_heads[il], *(sliding if swa[il] else full), swa=swa[il])
        for il in range(0 if meta.arch in _NO_KV_CACHE else n_layer)
    )
    return _Model(
        arch=meta.arch,
        ctx_train=meta.integer(keys.CONTEXT_LENGTH, 0),
        n_embd=n_embd,
        n_ff=_ffn_width(meta, n_layer_all),
        n_head=most_heads,
        n_vocab=meta.integer(keys.VOCAB_SIZE, 0) or meta.array_length(gguf.Keys.Tokenizer.LIST),
        window=window,
        layers=layers,
    )


def _ffn_width(meta: Metadata, n_layer: int) -> int:
    """Activations per token in the feed-forward part: the dense width, or the experts a token
    is routed to (plus the shared ones) in a mixture of experts."""
    keys = gguf.Keys.LLM
    dense = max(meta.per_layer(keys.FEED_FORWARD_LENGTH, n_layer, [0]), default=0)
    experts = max(meta.per_layer(keys.EXPERT_USED_COUNT, n_layer, [0]), default=0)
    expert_width = meta.integer(keys.EXPERT_FEED_FORWARD_LENGTH, 0)
    shared = meta.integer(keys.EXPERT_SHARED_COUNT, 0)
    shared_width = meta.integer(keys.EXPERT_SHARED_FEED_FORWARD_LENGTH, expert_width)
    return max(dense, experts * expert_width + shared * shared_width)


def _sliding_window(meta: Metadata, n_layer: int) -> tuple[int, list[bool]]:
    """The window and which layers slide, as llama.cpp's load_swa_pattern decides."""
    window = meta.integer(gguf.Keys.Attention.SLIDING_WINDOW, 0)
    pattern = meta.value(gguf.Keys.Attention.SLIDING_WINDOW_PATTERN)
    if window <= 0:
        return 0, [False] * n_layer
    if isinstance(pattern, list):
        return window, [bool(flag) for flag in pattern[:n_layer]] + [False] * (
            n_layer - len(pattern)
        )
    default = _SWA_PATTERNS.get(meta.arch)
    if default is None and pattern is None:
        return 0, [False] * n_layer
    n, dense_first = default if default is not None else (0, False)
    n = int(pattern) if pattern is not None else n
    if dense_first:
        return window, [n == 0 or il % n != 0 for il in range(n_layer)]
    return window, [n == 0 or il % n < n - 1 for il in range(n_layer)]


# --- llama-server's context ----------------------------------------------------------------

_PAD = 256  # llama.cpp pads every context and KV cache size to 256 cells


def _pad(cells: int) -> int:
    return -(-cells // _PAD) * _PAD


@dataclass(frozen=True)
class _Context:
    n_ctx: int  # over all slots
    n_ctx_seq: int  # cells of one stream of the full-attention cache
    swa_cells: int  # cells of one stream of the sliding-window cache
    streams: int  # 1 when the cache is unified, else one per slot
    slots: int
    ubatch: int  # tokens of the worst-case micro-batch llama.cpp reserves compute for


def _context(path: str, args: _Args, model: _Model) -> _Context:
    # tools/server/server.cpp: -np auto means 4 slots over one unified cache.
    slots, unified = args.parallel, args.kv_unified
    if slots < 0:
        slots, unified = _AUTO_SLOTS, True
    if slots == 0:
        raise GgufEstimateError(path, "-np 0 is not a number of slots")
    streams = 1 if unified else slots
    n_ctx = _requested_context(path, args, model, slots, streams)
    # src/llama-context.cpp: the batch is capped by the context, the micro-batch by the batch.
    batch = min(n_ctx, args.batch)
    ubatch = min(batch, args.ubatch or batch)
    n_ctx = _pad(n_ctx)
    n_ctx_seq = n_ctx if unified else _pad(n_ctx // slots)
    n_ctx = n_ctx if unified else n_ctx_seq * slots
    # src/llama-kv-cache-iswa.cpp: a sliding layer keeps its window (per slot, or for every
    # slot when unified) plus one micro-batch, padded; the whole context with --swa-full.
    swa_cells = min(n_ctx_seq, model.window * (slots if unified else 1) + ubatch)
    swa_cells = n_ctx_seq if args.swa_full else _pad(swa_cells)
    return _Context(n_ctx, n_ctx_seq, swa_cells, streams, slots, min(n_ctx, ubatch))


def _requested_context(path: str, args: _Args, model: _Model, slots: int, streams: int) -> int:
    """-c, or what llama-server makes of its absence or of -c 0."""
    if args.ctx:
        return args.ctx
    # --kv-unified-per-slot N sizes the context when -c is absent (an explicit -c 0 keeps the
    # model's full context).
    if args.per_slot > 0 and args.ctx is None:
        return slots * args.per_slot
    if model.ctx_train <= 0:
        raise GgufEstimateError(path, "no -c and no context length in its metadata")
    # common/fit.cpp: with --fit on (the default) an unset context becomes the training context
    # for each stream; without it llama_context spreads the training context over the slots.
    # --fit can also shrink it to fit free memory: not foreseeable here, so this is the most.
    return model.ctx_train * streams if args.fit else model.ctx_train


# --- The arithmetic ------------------------------------------------------------------------


def _row_bytes(path: str, type_name: str, width: int) -> int:
    """Bytes of ``width`` values of a ggml type, block overhead included (ggml_row_size)."""
    try:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name.upper()]]
    except KeyError:
        raise GgufEstimateError(path, f"unknown KV cache type {type_name!r}") from None
    return -(-width // block) * size


def _kv_bytes(path: str, args: _Args, model: _Model, ctx: _Context) -> int:
    # src/llama-kv-cache.cpp: per layer one K and one V tensor of
    # (head length x KV heads) x cells x streams; sliding layers have their own, smaller cells.
    total = 0
    for layer in model.layers:
        cells = ctx.swa_cells if layer.swa else ctx.n_ctx_seq
        row = _row_bytes(path, args.type_k, layer.key_length * layer.kv_heads) + _row_bytes(
            path, args.type_v, layer.value_length * layer.kv_heads
        )
        total += row * cells * ctx.streams
    return total


# Per token of the reserved micro-batch, llama.cpp's graph allocator (sched_reserve) peaked at
# 0.85-0.99 times (4 x n_ff + 2 x n_embd) f32 values with flash attention on the CPU, measured
# with build b11434: Gemma 3 270M (n_embd 640, n_ff 2048; 0.99: 21.28 MiB reported, 21.5 MiB
# estimated with the masks) and llama-shaped files of zeros with n_embd/n_ff of 1024/4096,
# 1024/8192, 2048/4096 and 512/1024. The peak's shape depends on each architecture's graph;
# erring high is the safer side for placement.
_FFN_FLOATS_PER_TOKEN = 4
_EMBD_FLOATS_PER_TOKEN = 2
_F32 = 4
_F16 = 2


def _compute_bytes(args: _Args, model: _Model, ctx: _Context) -> int:
    """Compute buffer plus output buffer: activations of one worst-case micro-batch, the f16
    attention masks (one per cache, a row per token), without flash attention the f32 score
    matrix of every head, and the logits of one token per slot (server-context.cpp asks for
    one output per slot)."""
    tokens = ctx.ubatch
    activations = (
        tokens * _F32 * (_FFN_FLOATS_PER_TOKEN * model.n_ff + _EMBD_FLOATS_PER_TOKEN * model.n_embd)
    )
    has_swa = any(layer.swa for layer in model.layers)
    has_full = any(not layer.swa for layer in model.layers)
    mask_cells = ctx.n_ctx_seq * has_full + ctx.swa_cells * has_swa
    masks = tokens * _F16 * mask_cells
    scores = 0 if args.flash_attn else tokens * _F32 * model.n_head * ctx.n_ctx_seq
    output = model.n_vocab * _F32 * ctx.slots
    return activations + masks + scores + output


# --- The process's own memory --------------------------------------------------------------

# llama-server's binary and libraries, and the heap it keeps whatever the model. The
# file-backed mappings other than the GGUF held 9.2-9.9 MiB of PSS at ready and after a chat
# completion (b11434 as scripts/real-model.sh builds it: static, CPU only; a build with GPU
# libraries maps more), and the line through the vocabulary measurements below leaves 0.5-2.6
# MiB of heap at zero tokens.
_PROCESS_BYTES = 11 * 2**20
# Heap per token of the vocabulary: llama_vocab's id_to_token and token_to_id, its cache of
# each token's piece, and what reading them from the GGUF leaves on the heap. Measured as the
# PSS of the heap and anonymous mappings minus the KV, output and compute buffers llama-server
# reported, with llama-shaped GGUFs of zeros 2 layers deep and 64 wide: 155-156 bytes a token
# for 32,000 to 262,144 short made-up tokens, SPM and BPE alike, and 167 bytes with Gemma 3's
# own 262,144 tokens (8.8 bytes long on average, 17,815 too long for std::string's inline 15).
_TOKEN_BYTES = 160
# Heap per BPE merge (tokenizer.ggml.merges): llama_vocab's bpe_ranks, a hash map of string
# pairs. Measured the same way with 131,072 tokens and 1, 131,072 or 262,144 merges: 113-119
# bytes a merge. Llama 3's 280,147 merges take 32 MiB.
_MERGE_BYTES = 120

# The tensor types b11434's CPU backend repacks for its matrix-multiplication kernels on x86-64
# with AVX2 (ggml/src/ggml-cpu/repack.cpp, ggml_repack_get_optimal_repack_type), each when the
# weight's rows come in whole groups of 8 (ne[1] % 8 == 0). The repacked copy is as large as
# the original (ggml_nbytes) and comes on top of the mapped file, whose pages loading read.
# Which kernels exist is decided when llama.cpp is compiled (ggml_cpu_has_avx2 is
# ``#if defined(__AVX2__)``), not by the CPU it runs on: this is the set of an AVX2 build such
# as scripts/real-model.sh's (GGML_NATIVE=OFF). An AVX-512 build also repacks Q2_K, an ARM
# build with dotprod or i8mm also Q5_K, Q6_K, Q8_0 and Q1_0, and a build without AVX2 none of
# these: there the copy is counted short or in excess.
_REPACKED = frozenset(
    {
        gguf.GGMLQuantizationType.Q4_0,
        gguf.GGMLQuantizationType.Q4_K,
        gguf.GGMLQuantizationType.IQ4_NL,
        gguf.GGMLQuantizationType.MXFP4,
    }
)
_REPACK_ROWS = 8
# Weights read by row (GGML_OP_GET_ROWS in src/llama-arch.cpp's tensor infos): the repack
# buffer serves only matrix multiplications, so these stay in the mapped file.
_ROW_LOOKUPS = re.compile(
    r"^(token_embd|position_embd|token_types|per_layer_token_embd|blk\.\d+\.nextn\.embed_tokens)"
    r"\.weight$"
)
# A model without an output matrix multiplies by its token embeddings instead, which llama.cpp
# then loads a second time as the output (TENSOR_DUPLICATED, src/llama-model-loader.cpp): a
# tensor of its own in the repack buffer when its type is repacked, however the file is loaded.
_OUTPUT, _TOKEN_EMBD = "output.weight", "token_embd.weight"
# --load-mode values that map the file (common/arg.cpp; "auto" maps it on the CPU). The others
# read the weights into memory, the repacked ones straight into their new layout: no second
# copy of those. Checked with b11434 on llama-shaped GGUFs of zeros with Q4_0, Q4_K, IQ4_NL and
# MXFP4 matrices of 256 and 260 rows, tied and untied, mapped, read (-lm none) and -nr: the
# CPU_REPACK and model buffers llama-server reported agreed with this to their 0.01 MiB.
_MAPPED_LOAD_MODES = frozenset({"auto", "mmap", "mmap+mlock"})


def _host_bytes(args: _Args, meta: Metadata, readers: Sequence[gguf.GGUFReader]) -> int:
    """The process's own memory beyond weights, KV cache and compute: binary and libraries,
    the vocabulary's tables, and the repacked copy of some weights."""
    tokens = meta.array_length(gguf.Keys.Tokenizer.LIST)
    merges = meta.array_length(gguf.Keys.Tokenizer.MERGES)
    vocabulary = tokens * _TOKEN_BYTES + merges * _MERGE_BYTES
    return _PROCESS_BYTES + vocabulary + _repacked_bytes(args, readers)


def _repacked_bytes(args: _Args, readers: Sequence[gguf.GGUFReader]) -> int:
    """Bytes llama.cpp's CPU_REPACK buffer holds beyond the weights' own: every repacked
    matrix when the file is mapped (the mapped original stays), and a tied output's copy."""
    if not args.repack:
        return 0
    tensors = [tensor for reader in readers for tensor in reader.tensors]
    matrices = sum(
        int(tensor.n_bytes)
        for tensor in tensors
        if _repackable(tensor) and not _ROW_LOOKUPS.match(tensor.name)
    )
    untied = any(tensor.name == _OUTPUT for tensor in tensors)
    tied = sum(
        int(tensor.n_bytes)
        for tensor in tensors
        if not untied and tensor.name == _TOKEN_EMBD and _repackable(tensor)
    )
    return (matrices if args.load_mode in _MAPPED_LOAD_MODES else 0) + tied


def _repackable(tensor: gguf.ReaderTensor) -> bool:
    # A matrix (MUL_MAT) or a stack of experts' matrices (MUL_MAT_ID); shape is ggml's ne.
    shape = tensor.shape
    return (
        tensor.tensor_type in _REPACKED
        and len(shape) in (2, 3)
        and int(shape[1]) % _REPACK_ROWS == 0
    )


# --- The estimate --------------------------------------------------------------------------


def estimate_command(argv: Sequence[str]) -> GgufEstimate | None:
    """None when the command names no .gguf. Raises GgufEstimateError (subclass of ValueError,
    message naming the file and reason) when the file is missing/unreadable/not a GGUF."""
    path = gguf_path(argv)
    if path is None:
        return None
    args = _parse_args(path, argv)
    parts = part_paths(path)
    first = open_gguf(parts[0])
    meta = Metadata(parts[0], first)
    model = _model(meta)
    readers = [first, *(open_gguf(part) for part in parts[1:])]
    weights = sum(tensor_bytes(reader) for reader in readers)
    ctx = _context(path, args, model)
    cache_types = args.type_k if args.type_k == args.type_v else f"{args.type_k}/{args.type_v}"
    return GgufEstimate(
        path=path,
        weights=weights,
        kv_cache=_kv_bytes(path, args, model, ctx),
        compute=_compute_bytes(args, model, ctx),
        host=_host_bytes(args, meta, readers),
        context=ctx.n_ctx,
        slots=ctx.slots,
        cache_types=cache_types,
    )
