"""The memory estimate from a GGUF's metadata (trioserve/memory/gguf_estimate.py): tiny GGUFs
written here with the ``gguf`` library, the arithmetic checked to the byte, and the estimate
for the real Gemma 3 270M against the buffers llama-server b11434 reported for it and the
memory its process held. The reader itself is tested in tests/test_gguf_reader.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from tests.support.gguf import (
    ARCH,
    CTX_TRAIN,
    EMBD,
    F16_ROW,
    FF,
    HEAD,
    HEADS,
    KV_HEADS,
    LAYERS,
    VOCAB,
    MiB,
    write_gguf,
)
from tests.support.real_model import gguf as real_gguf
from tests.support.real_model import llama_cmd
from trioserve.memory.gguf_estimate import (
    GgufEstimate,
    GgufEstimateError,
    estimate_command,
    gguf_path,
)


def estimate(path: Path, *args: str) -> GgufEstimate:
    result = estimate_command(["llama-server", "--port", "{port}", "-m", str(path), *args])
    assert result is not None
    return result


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_gguf(tmp_path / "model.gguf")


# --- Which file ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["llama-server", "-m", "/m/a.gguf", "--port", "{port}"], "/m/a.gguf"),
        (["llama-server", "--model", "/m/a.gguf"], "/m/a.gguf"),
        (["server", "--model=/m/a.gguf"], "/m/a.gguf"),
        (["server", "--mmproj", "/m/proj.GGUF", "-m", "/m/a.gguf"], "/m/a.gguf"),
        (["server", "/m/a.gguf", "--alias", "a"], "/m/a.gguf"),
        (["{python}", "-m", "mlx_lm.server", "--model", "/m/a.gguf"], "/m/a.gguf"),
        (["{python}", "-m", "trioserve.backends.echo", "--port", "{port}"], None),
        (["vllm", "serve", "--model", "Qwen/Qwen3-8B"], None),
        ([], None),
    ],
)
def test_gguf_path_is_the_model_flag_else_the_first_gguf(
    argv: list[str], expected: str | None
) -> None:
    assert gguf_path(argv) == expected


def test_a_command_without_a_gguf_has_no_estimate() -> None:
    assert estimate_command(["{python}", "-m", "trioserve.backends.echo"]) is None


# --- Weights -------------------------------------------------------------------------------


def test_weights_are_the_bytes_of_all_tensors_quantized_ones_included(tmp_path: Path) -> None:
    path = write_gguf(
        tmp_path / "model.gguf",
        tensors={
            "norm": (np.zeros(64, np.float32), None),  # 256 bytes
            "embd": (np.zeros((VOCAB, 64), np.float16), None),  # 12,800 bytes
            # Q8_0: blocks of 32 values in 34 bytes; 2 rows of 64 values = 4 blocks.
            "q8": (np.zeros((2, 68), np.uint8), gguf.GGMLQuantizationType.Q8_0),
        },
    )
    assert estimate(path, "-c", "256").weights == 256 + 12_800 + 4 * 34


def test_split_models_add_up_every_part(tmp_path: Path) -> None:
    write_gguf(
        tmp_path / "big.gguf",
        tensors={name: (np.zeros(1024, np.float32), None) for name in ("a", "b", "c")},
        split_max_tensors=1,
    )
    first = tmp_path / "big-00001-of-00003.gguf"
    result = estimate(first, "-c", "256")
    assert result.weights == 3 * 4096
    assert result.kv_cache == LAYERS * 2 * F16_ROW * 256  # the metadata of part 1


def test_a_missing_part_of_a_split_model_is_named(tmp_path: Path) -> None:
    write_gguf(
        tmp_path / "big.gguf",
        tensors={name: (np.zeros(8, np.float32), None) for name in ("a", "b")},
        split_max_tensors=1,
    )
    (tmp_path / "big-00002-of-00002.gguf").unlink()
    with pytest.raises(GgufEstimateError, match=r"big-00002-of-00002\.gguf: no such file"):
        estimate(tmp_path / "big-00001-of-00002.gguf")


# --- KV cache ------------------------------------------------------------------------------


def test_kv_cache_is_layers_times_k_and_v_rows_times_cells(model: Path) -> None:
    # -c 1000 is padded to 1024 cells, as llama.cpp pads every context to 256.
    result = estimate(model, "-c", "1000", "-np", "1")
    assert result.kv_cache == LAYERS * 2 * F16_ROW * 1024
    assert result.context == 1024


def test_gqa_sizes_by_kv_heads_and_each_head_length(tmp_path: Path) -> None:
    path = write_gguf(
        tmp_path / "model.gguf",
        meta={
            gguf.Keys.Attention.HEAD_COUNT_KV: 1,
            gguf.Keys.Attention.KEY_LENGTH: 32,
            gguf.Keys.Attention.VALUE_LENGTH: 8,
        },
    )
    assert estimate(path, "-c", "512").kv_cache == LAYERS * (32 + 8) * 2 * 512


def test_kv_heads_per_layer_from_an_array(tmp_path: Path) -> None:
    # Hybrid models list 0 KV heads for their recurrent layers: those keep no KV cache.
    path = write_gguf(
        tmp_path / "model.gguf", meta={gguf.Keys.Attention.HEAD_COUNT_KV: [2, 0, 1, 0]}
    )
    assert estimate(path, "-c", "256").kv_cache == (2 + 1) * HEAD * 2 * 2 * 256


def test_kv_heads_default_to_query_heads_and_head_length_to_embd_over_heads(
    tmp_path: Path,
) -> None:
    path = write_gguf(
        tmp_path / "model.gguf",
        meta={
            gguf.Keys.Attention.HEAD_COUNT_KV: None,
            gguf.Keys.Attention.KEY_LENGTH: None,
            gguf.Keys.Attention.VALUE_LENGTH: None,
        },
    )
    # 4 heads of 64 / 4 = 16 values, K and V, f16.
    assert estimate(path, "-c", "256").kv_cache == LAYERS * 2 * (HEADS * 16 * 2) * 256


def test_slots_share_the_context_in_streams_of_their_own(model: Path) -> None:
    one = estimate(model, "-c", "4096", "-np", "1")
    two = estimate(model, "-c", "4096", "-np", "2")
    unified = estimate(model, "-c", "4096", "-np", "2", "--kv-unified")
    assert one.kv_cache == two.kv_cache == unified.kv_cache == LAYERS * 2 * F16_ROW * 4096
    assert (two.context, two.slots) == (4096, 2)
    # Per slot, padded to 256 cells: 3 slots of 1000 / 3 -> 512 cells each.
    assert estimate(model, "-c", "1000", "-np", "3").kv_cache == LAYERS * 2 * F16_ROW * 3 * 512


@pytest.mark.parametrize(
    ("k", "v", "k_row", "v_row"),
    [
        # 32 values a row: f32 4 bytes each, bf16 2; q8_0 one block of 34 bytes, q4_0 of 18,
        # q5_1 of 24, iq4_nl of 18.
        ("f32", "f32", 128, 128),
        ("bf16", "f16", 64, 64),
        ("q8_0", "q4_0", 34, 18),
        ("q5_1", "iq4_nl", 24, 18),
    ],
)
def test_cache_types_size_rows_with_their_block_overhead(
    model: Path, k: str, v: str, k_row: int, v_row: int
) -> None:
    result = estimate(model, "-c", "256", "-ctk", k, "--cache-type-v", v)
    assert result.kv_cache == LAYERS * (k_row + v_row) * 256
    assert result.cache_types == (k if k == v else f"{k}/{v}")


def test_an_unknown_cache_type_is_an_error_naming_it(model: Path) -> None:
    with pytest.raises(GgufEstimateError, match=r"model\.gguf: unknown KV cache type 'q3_z'"):
        estimate(model, "-ctk", "q3_z")


# --- Sliding-window attention --------------------------------------------------------------

WINDOW = 128


def swa_model(tmp_path: Path, arch: str = "gemma3", **meta: Any) -> Path:
    fields = {gguf.Keys.LLM.BLOCK_COUNT: 12, gguf.Keys.Attention.SLIDING_WINDOW: WINDOW}
    fields.update({getattr(gguf.Keys.Attention, key.upper()): value for key, value in meta.items()})
    return write_gguf(tmp_path / "swa.gguf", arch=arch, meta=fields)


def test_gemma3_keeps_the_whole_context_in_every_sixth_layer_only(tmp_path: Path) -> None:
    # Layers 5 and 11 are global (llama.cpp: il % 6 == 5); the 10 others keep the window plus
    # one micro-batch, padded: 128 + 512 -> 768 cells.
    result = estimate(swa_model(tmp_path), "-c", "4096", "-np", "1")
    assert result.kv_cache == 2 * F16_ROW * (2 * 4096 + 10 * 768)


def test_swa_full_keeps_the_whole_context_in_every_layer(tmp_path: Path) -> None:
    result = estimate(swa_model(tmp_path), "-c", "4096", "--swa-full", "-np", "1")
    assert result.kv_cache == 2 * F16_ROW * 12 * 4096


def test_the_window_is_per_slot_and_capped_by_the_slots_context(tmp_path: Path) -> None:
    path = swa_model(tmp_path)
    # Two streams of 2048 cells; each sliding layer keeps 768 cells per stream.
    two = estimate(path, "-c", "4096", "-np", "2")
    assert two.kv_cache == 2 * F16_ROW * 2 * (2 * 2048 + 10 * 768)
    # Unified: one stream holding both slots' windows, 2 x 128 + 512 -> 768 cells.
    unified = estimate(path, "-c", "4096", "-np", "2", "-kvu")
    assert unified.kv_cache == 2 * F16_ROW * (2 * 4096 + 10 * 768)
    # A context smaller than window + micro-batch caps it: 512 cells everywhere.
    small = estimate(path, "-c", "512", "-np", "1")
    assert small.kv_cache == 2 * F16_ROW * 12 * 512


def test_the_micro_batch_widens_the_window_cache(tmp_path: Path) -> None:
    result = estimate(swa_model(tmp_path), "-c", "4096", "-np", "1", "-ub", "1024")
    # 128 + 1024 -> 1280 cells (padded to 256).
    assert result.kv_cache == 2 * F16_ROW * (2 * 4096 + 10 * 1280)


def test_a_pattern_array_in_the_metadata_marks_each_layer(tmp_path: Path) -> None:
    # Any architecture: the per-layer booleans decide (layer 1 global, the others sliding).
    path = write_gguf(
        tmp_path / "p.gguf",
        meta={
            gguf.Keys.Attention.SLIDING_WINDOW: WINDOW,
            gguf.Keys.Attention.SLIDING_WINDOW_PATTERN: [True, False, True, True],
        },
    )
    result = estimate(path, "-c", "4096", "-np", "1")
    assert result.kv_cache == 2 * F16_ROW * (1 * 4096 + 3 * 768)


def test_a_pattern_number_in_the_metadata_overrides_the_architectures(tmp_path: Path) -> None:
    # n = 3 for 12 layers: 2, 5, 8, 11 global.
    path = swa_model(tmp_path, sliding_window_pattern=3)
    result = estimate(path, "-c", "4096", "-np", "1")
    assert result.kv_cache == 2 * F16_ROW * (4 * 4096 + 8 * 768)


def test_a_window_without_a_known_pattern_counts_every_layer_global(tmp_path: Path) -> None:
    # Too much rather than too little: llama.cpp may ignore the window (it does for Phi-3).
    result = estimate(swa_model(tmp_path, ARCH), "-c", "4096", "-np", "1")
    assert result.kv_cache == 2 * F16_ROW * 12 * 4096


def test_swa_layers_use_their_own_head_lengths(tmp_path: Path) -> None:
    path = swa_model(tmp_path, key_length_swa=8, value_length_swa=8)
    result = estimate(path, "-c", "4096", "-np", "1")
    # Global layers: K and V rows of 16 values a head; sliding ones: of 8.
    assert result.kv_cache == 2 * 4096 * 2 * F16_ROW + 10 * 768 * 2 * (KV_HEADS * 8 * 2)


# --- The context llama-server picks --------------------------------------------------------


def test_ctx_zero_means_the_training_context_for_each_slot_with_fit(model: Path) -> None:
    # common/fit.cpp (--fit on by default): the training context per stream.
    assert estimate(model, "-c", "0", "-np", "1").context == CTX_TRAIN
    assert estimate(model, "-c", "0", "-np", "2").context == 2 * CTX_TRAIN
    # Without --fit, llama_context spreads the training context over the slots.
    assert estimate(model, "-c", "0", "-np", "2", "--fit", "off").context == CTX_TRAIN


def test_no_ctx_and_no_slots_mean_four_slots_sharing_the_training_context(model: Path) -> None:
    result = estimate(model)
    assert (result.context, result.slots) == (CTX_TRAIN, 4)
    assert result.kv_cache == LAYERS * 2 * F16_ROW * CTX_TRAIN


def test_kv_unified_per_slot_sizes_an_unset_context(model: Path) -> None:
    assert estimate(model, "-np", "2", "--kv-unified-per-slot", "512").context == 1024
    # An explicit -c 0 asks for the full context instead.
    assert estimate(model, "-c", "0", "-np", "1", "--kv-unified-per-slot", "512").context == (
        CTX_TRAIN
    )


def test_the_last_occurrence_wins_and_underscores_spell_dashes(model: Path) -> None:
    assert estimate(model, "-c", "512", "--ctx_size", "2048").context == 2048
    assert estimate(model, "--cache_type_k=q8_0").cache_types == "q8_0/f16"


def test_a_model_without_a_training_context_needs_c(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "model.gguf", meta={gguf.Keys.LLM.CONTEXT_LENGTH: None})
    assert estimate(path, "-c", "256").context == 256
    with pytest.raises(GgufEstimateError, match="no -c and no context length"):
        estimate(path)


def test_a_bad_number_is_an_error_naming_the_option(model: Path) -> None:
    with pytest.raises(GgufEstimateError, match="-c 'lots' is not a whole number"):
        estimate(model, "-c", "lots")


# --- Compute -------------------------------------------------------------------------------


def test_compute_holds_one_logits_row_per_slot(model: Path) -> None:
    # Unified, the same cache for one slot or two: only the logits buffer differs.
    one = estimate(model, "-c", "1024", "-np", "1", "-kvu")
    two = estimate(model, "-c", "1024", "-np", "2", "-kvu")
    assert two.compute - one.compute == VOCAB * 4


def test_compute_grows_with_the_micro_batch(model: Path) -> None:
    small = estimate(model, "-c", "4096", "-ub", "256", "-np", "1")
    large = estimate(model, "-c", "4096", "-ub", "1024", "-np", "1")
    # Activations (4 x n_ff + 2 x n_embd f32 values) and an f16 mask row per token.
    per_token = 4 * (4 * FF + 2 * EMBD) + 2 * 4096
    assert large.compute - small.compute == 768 * per_token


def test_without_flash_attention_compute_holds_the_scores(model: Path) -> None:
    on = estimate(model, "-c", "4096", "-np", "1")
    off = estimate(model, "-c", "4096", "-np", "1", "-fa", "off")
    assert off.compute - on.compute == 512 * 4 * HEADS * 4096


# --- The process's own memory --------------------------------------------------------------

# What gguf_estimate.py counts for llama-server itself (binary, libraries, fixed heap), for each
# token of the vocabulary, and for each BPE merge.
PROCESS, PER_TOKEN, PER_MERGE = 11 * MiB, 160, 120
Q = gguf.GGMLQuantizationType


def quantized(
    rows: int, columns: int, kind: gguf.GGMLQuantizationType
) -> tuple[np.ndarray[Any, Any], gguf.GGMLQuantizationType]:
    """A tensor of ``rows`` x ``columns`` values of a quantized type, as write_gguf takes it."""
    block, size = gguf.GGML_QUANT_SIZES[kind]
    return np.zeros((rows, columns // block * size), np.uint8), kind


def test_host_is_the_process_and_a_share_per_vocabulary_token(tmp_path: Path) -> None:
    small = write_gguf(tmp_path / "small.gguf", tokens=100)
    large = write_gguf(tmp_path / "large.gguf", tokens=3000)
    assert estimate(small, "-c", "256").host == PROCESS + 100 * PER_TOKEN
    assert estimate(large, "-c", "256").host == PROCESS + 3000 * PER_TOKEN


def test_host_counts_bpe_merges_apart_from_tokens(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "bpe.gguf", tokens=100, merges=250)
    assert estimate(path, "-c", "256").host == PROCESS + 100 * PER_TOKEN + 250 * PER_MERGE


def test_a_gguf_without_a_vocabulary_costs_the_process_alone(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "bare.gguf", tokens=0)
    assert estimate(path, "-c", "256").host == PROCESS


def test_host_is_in_the_total(model: Path) -> None:
    result = estimate(model, "-c", "256")
    assert result.total == result.weights + result.kv_cache + result.compute + result.host


def repack_model(tmp_path: Path, *, tied: bool) -> Path:
    """Q4 matrices the CPU backend repacks (rows in groups of 8) and ones it does not."""
    tensors = {
        "token_embd.weight": quantized(VOCAB * 8, 64, Q.Q4_0),  # read by row: never repacked
        "blk.0.attn_q.weight": quantized(64, 64, Q.Q4_0),  # 64 rows of 2 blocks of 18 bytes
        "blk.0.attn_k.weight": quantized(32, 256, Q.Q4_K),  # 32 rows of 1 block of 144
        "blk.0.attn_v.weight": quantized(16, 64, Q.IQ4_NL),  # 16 rows of 2 blocks of 18
        "blk.0.attn_output.weight": quantized(8, 64, Q.MXFP4),  # 8 rows of 2 blocks of 17
        "blk.0.ffn_up.weight": quantized(12, 64, Q.Q4_0),  # 12 rows: not whole groups of 8
        "blk.0.ffn_gate.weight": quantized(64, 64, Q.Q8_0),  # a type kept as it is
        "blk.0.ffn_norm.weight": (np.zeros(64, np.float32), None),
    }
    if not tied:
        tensors["output.weight"] = quantized(VOCAB, 64, Q.Q8_0)
    return write_gguf(tmp_path / f"repack-{tied}.gguf", tensors=tensors)


REPACKED = 64 * 36 + 32 * 144 + 16 * 36 + 8 * 34
TOKEN_EMBD = VOCAB * 8 * 36


def test_mapped_weights_the_cpu_repacks_are_counted_twice(tmp_path: Path) -> None:
    result = estimate(repack_model(tmp_path, tied=False), "-c", "256")
    assert result.host == PROCESS + VOCAB * PER_TOKEN + REPACKED


def test_tied_token_embeddings_get_a_repacked_copy_as_the_output(tmp_path: Path) -> None:
    # Without output.weight, llama.cpp loads token_embd a second time for the output matrix.
    result = estimate(repack_model(tmp_path, tied=True), "-c", "256")
    assert result.host == PROCESS + VOCAB * PER_TOKEN + REPACKED + TOKEN_EMBD


@pytest.mark.parametrize("tied", [False, True])
def test_no_repack_and_a_read_file_leave_no_second_copy(tmp_path: Path, tied: bool) -> None:
    path = repack_model(tmp_path, tied=tied)
    base = PROCESS + VOCAB * PER_TOKEN
    assert estimate(path, "-c", "256", "-nr").host == base
    assert estimate(path, "-c", "256", "--no-repack", "--repack", "-nr").host == base
    # Read rather than mapped, the matrices are loaded only in their repacked layout; a tied
    # output is still a tensor of its own.
    assert estimate(path, "-c", "256", "--load-mode", "none").host == base + TOKEN_EMBD * tied
    assert estimate(path, "-c", "256", "-lm", "mmap").host == base + REPACKED + TOKEN_EMBD * tied


# --- The result ----------------------------------------------------------------------------


def test_total_and_describe(model: Path) -> None:
    result = GgufEstimate(
        path="/m/gemma.gguf",
        weights=241 * MiB,
        kv_cache=36 * MiB,
        compute=12 * MiB,
        host=52 * MiB,
        context=4096,
        slots=2,
        cache_types="q8_0/q4_0",
    )
    assert result.total == 341 * MiB
    assert result.describe() == (
        "gemma.gguf: weights 241.0 MiB + KV 36.0 MiB (ctx 4096 in 2 slots, q8_0/q4_0)"
        " + compute 12.0 MiB + host 52.0 MiB"
    )
    assert "(ctx 1024, f16)" in estimate(model, "-c", "1024", "-np", "1").describe()


# --- Bad files -----------------------------------------------------------------------------


def test_a_missing_file_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "absent.gguf"
    with pytest.raises(GgufEstimateError, match=r"absent\.gguf: no such file") as raised:
        estimate(path)
    assert isinstance(raised.value, ValueError)
    assert raised.value.path == str(path)


@pytest.mark.parametrize(
    "content",
    [b"", b"this is not a model at all, just some text" * 10, b"GGUF\x03\x00\x00\x00"],
    ids=["empty", "text", "truncated-header"],
)
def test_a_file_that_is_not_a_gguf_is_an_error_naming_it(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.gguf"
    path.write_bytes(content)
    with pytest.raises(GgufEstimateError, match=r"garbage\.gguf: not a readable GGUF"):
        estimate(path)


def test_a_gguf_cut_short_inside_its_vocabulary_is_an_error(model: Path) -> None:
    data = model.read_bytes()
    cut = data.index(b"t50")  # inside tokenizer.ggml.tokens
    model.write_bytes(data[:cut])
    with pytest.raises(GgufEstimateError, match=r"model\.gguf: not a readable GGUF"):
        estimate(model)


def test_a_directory_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "dir.gguf"
    path.mkdir()
    with pytest.raises(GgufEstimateError, match=r"dir\.gguf: "):
        estimate(path)


def test_a_gguf_without_an_architecture_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "noarch.gguf"
    writer = gguf.GGUFWriter(str(path), ARCH)
    writer.add_tensor("w", np.zeros(4, np.float32))
    writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GgufEstimateError, match=r"no general\.architecture"):
        estimate(path, "-c", "256")


# --- The real model ------------------------------------------------------------------------

# What llama-server b11434 printed on stderr (-lv 4) for tests/support/real_model.py's
# llama_cmd with --threads 1 on x86-64 (an AVX2 build), and the process's PSS (psutil
# memory_full_info) once /health answered and after one short chat completion, in MiB:
#   slots  model buffer          KV buffers      compute + output   PSS ready    after chat
#   1      235.16 (+12.66 rp)    6.00 + 15.00    21.28 + 1.00       325.1-325.6  330.1-331.2
#   2      235.16 (+12.66 rp)    12.00 + 30.00   21.28 + 2.00       347.5-348.2  352.5-353.4
# "rp": the Q4_K matrices repacked for the CPU, a second copy counted in host. The estimate is
# 5 % above PSS at ready: it counts the whole compute buffer, of which a short prompt touches
# little, and host's ~40 MiB of vocabulary tables that PSS holds too.
REPORTED = {
    1: {"weights": 235.16, "kv": 21.00, "compute": 22.28, "repacked": 12.66, "pss": 325.6},
    2: {"weights": 235.16, "kv": 42.00, "compute": 23.28, "repacked": 12.66, "pss": 348.2},
}


@pytest.mark.skipif(not real_gguf().is_file(), reason=f"no {real_gguf()} (`make real-model`)")
@pytest.mark.parametrize("parallel", [1, 2])
def test_the_real_gemma_estimate_matches_llama_server_s_own_buffers(parallel: int) -> None:
    result = estimate_command(llama_cmd(parallel=parallel))
    unpacked = estimate_command([*llama_cmd(parallel=parallel), "--no-repack"])
    assert result is not None and unpacked is not None
    reported = REPORTED[parallel]
    assert result.weights / MiB == pytest.approx(reported["weights"], abs=0.01)
    assert result.kv_cache / MiB == pytest.approx(reported["kv"], abs=0.01)
    assert result.compute / MiB == pytest.approx(reported["compute"], rel=0.10)
    assert (result.host - unpacked.host) / MiB == pytest.approx(reported["repacked"], abs=0.01)
    # A planning figure: at or a little above what the process holds once ready.
    assert 1.0 <= result.total / MiB / reported["pss"] <= 1.10
