"""What placement counts of a model's figures (``memory/figures.py``, pure): a declared size
stands unless measured more than 10 % over it; an estimate gives way to any measurement; a GPU
model's host memory counts on the CPU; the warnings say so."""

from __future__ import annotations

from trioserve.config import ModelConfig
from trioserve.memory.figures import CommandFigures

MIB = 2**20
CPU_BUDGET = {"cpu": 1024 * MIB}


def model(**settings: object) -> ModelConfig:
    return ModelConfig.model_validate({"cmd": ["x"], **settings})


def test_a_declared_size_stands_when_measured_up_to_ten_percent_over() -> None:
    declared = model(memory="100 MiB")
    figures = CommandFigures(measured={"cpu": 105 * MIB})
    assert figures.need(declared) == {"cpu": 100 * MIB}
    assert figures.warnings(declared, CPU_BUDGET) == []


def test_measured_more_than_ten_percent_over_a_declared_size_wins_and_warns() -> None:
    declared = model(memory="100 MiB")
    figures = CommandFigures(measured={"cpu": 115 * MIB})
    assert figures.need(declared) == {"cpu": 115 * MIB}
    assert figures.warnings(declared, CPU_BUDGET) == [
        "measured 115.0 MiB on cpu, 15% over the 100.0 MiB declared: the measured figure is used"
    ]


def test_an_estimate_gives_way_to_any_measurement_and_warns_only_over_the_margin() -> None:
    auto = model()
    near = CommandFigures(estimate=100 * MIB, measured={"cpu": 95 * MIB})
    assert near.need(auto) == {"cpu": 95 * MIB}
    assert near.warnings(auto, CPU_BUDGET) == []
    over = CommandFigures(estimate=100 * MIB, measured={"cpu": 120 * MIB})
    assert over.warnings(auto, CPU_BUDGET) == [
        "measured 120.0 MiB on cpu, 20% over the 100.0 MiB estimated: the measured figure is used"
    ]


def test_a_gpu_models_host_memory_counts_on_the_cpu() -> None:
    gpu = model(memory="6 GiB", devices=["cuda:0"])
    figures = CommandFigures(measured={"cpu": 300 * MIB})
    assert figures.need(gpu) == {"cuda:0": 6 * 1024 * MIB, "cpu": 300 * MIB}


def test_an_estimate_is_split_over_the_gpus() -> None:
    two = model(devices=["cuda:0", "cuda:1"])
    assert CommandFigures(estimate=10 * MIB).estimated(two) == {
        "cuda:0": 5 * MIB,
        "cuda:1": 5 * MIB,
    }


def test_unknown_memory_is_warned_about_only_where_a_budget_would_count_it() -> None:
    unknown = CommandFigures(estimate_note="its command names no .gguf to estimate from")
    assert unknown.need(model()) == {"cpu": 0}
    assert unknown.warnings(model(), {}) == []
    assert unknown.warnings(model(), CPU_BUDGET) == [
        "memory not yet known: counted as 0 until measured "
        "(its command names no .gguf to estimate from)"
    ]
