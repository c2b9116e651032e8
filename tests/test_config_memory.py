"""The memory keys of the config: sizes, devices, budgets, and the models that could never fit
(refused before anything starts, naming both numbers)."""

from __future__ import annotations

from typing import Any

import pytest

from trioserve.config import parse_config
from trioserve.errors import ConfigError
from trioserve.sizes import format_size, parse_size

GIB = 2**30


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("6 GiB", 6 * GIB),
        ("6GiB", 6 * GIB),
        ("1.5 gib", 3 * GIB // 2),
        ("512 MiB", 512 * 2**20),
        ("512M", 512 * 2**20),
        ("20 GB", 20 * 10**9),
        ("100", 100),
        (4096, 4096),
    ],
)
def test_sizes_as_people_write_them(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "6 GiBs", "-1 GiB", "", True, 1.5, -3])
def test_what_is_not_a_size_is_refused(text: object) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_sizes_print_in_the_largest_binary_unit() -> None:
    assert format_size(6 * GIB) == "6.0 GiB"
    assert format_size(2254857830) == "2.1 GiB"
    assert format_size(300 * 2**20) == "300.0 MiB"
    assert format_size(12) == "12 B"


def config(models: dict[str, dict[str, Any]], **supervisor: Any) -> Any:
    return parse_config(
        {
            "supervisor": supervisor,
            "models": {name: {"cmd": ["x"], **model} for name, model in models.items()},
        },
        "conf/x.toml",
    )


def refused(models: dict[str, dict[str, Any]], **supervisor: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        config(models, **supervisor)
    return str(caught.value)


def test_defaults_are_auto_on_the_cpu_with_no_budget() -> None:
    loaded = config({"m": {}})
    model = loaded.models["m"]
    assert (model.memory, model.devices, model.preload, model.pinned) == (
        "auto",
        ["cpu"],
        False,
        False,
    )
    assert model.declared_memory is None
    assert loaded.supervisor.memory == {} and loaded.supervisor.swap_after == 10


def test_budgets_and_sizes_are_read_as_bytes() -> None:
    loaded = config(
        {"m": {"memory": "6 GiB", "devices": ["cuda:0"]}},
        memory={"cpu": "20 GiB", "cuda:0": "79 GiB"},
    )
    assert loaded.supervisor.memory == {"cpu": 20 * GIB, "cuda:0": 79 * GIB}
    assert loaded.models["m"].declared_memory == 6 * GIB


def test_a_bad_size_names_its_key() -> None:
    assert refused({"m": {"memory": "lots"}}).startswith("conf/x.toml: models.m.memory: 'lots'")


def test_a_bad_device_names_its_key() -> None:
    assert refused({}, memory={"gpu0": "1 GiB"}).startswith(
        "conf/x.toml: supervisor.memory.gpu0: 'gpu0' is not a device"
    )
    assert "a device is listed twice" in refused({"m": {"devices": ["cuda:0", "cuda:0"]}})
    assert "models.m.devices: must not be empty" in refused({"m": {"devices": []}})


def test_a_model_larger_than_its_devices_budget_never_fits() -> None:
    message = refused(
        {"big": {"memory": "6 GiB", "devices": ["cuda:0"]}}, memory={"cuda:0": "4 GiB"}
    )
    assert message == (
        "conf/x.toml: models.big.memory: needs 6.0 GiB on cuda:0, more than its budget of "
        "4.0 GiB (supervisor.memory): it could never start"
    )


def test_a_model_larger_than_what_pinned_models_leave_never_fits() -> None:
    message = refused(
        {
            "resident": {"memory": "3 GiB", "pinned": True},
            "big": {"memory": "2 GiB"},
        },
        memory={"cpu": "4 GiB"},
    )
    assert message == (
        "conf/x.toml: models.big.memory: needs 2.0 GiB on cpu, but the pinned models "
        "(resident) leave 1.0 GiB of its 4.0 GiB budget: it could never start"
    )


def test_a_device_without_a_budget_takes_any_size() -> None:
    config({"m": {"memory": "600 GiB", "devices": ["cuda:1"]}}, memory={"cuda:0": "1 GiB"})


def test_more_pinned_models_than_max_loaded_is_refused() -> None:
    message = refused(
        {"a": {"pinned": True}, "b": {"pinned": True}, "c": {"pinned": True}}, max_loaded=2
    )
    assert message.startswith("conf/x.toml: models.c.pinned: 3 models are pinned (a, b, c)")


def test_swap_after_must_not_be_negative() -> None:
    assert refused({}, swap_after=-1) == "conf/x.toml: supervisor.swap_after: must be >= 0"
