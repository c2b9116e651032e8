"""What a model needs on each device: declared, estimated from its GGUF, or measured.

Figures are kept per *command* (``command_key``: the argv and env with the placeholders filled
but ``{port}``, and the devices), not per model name: a measurement says what this program with
these arguments, this environment, on these devices used, so a reload that changes any of them
starts from the new command's own figures. The state store keeps the measured ones for the
next start.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from trioserve.config import Config, ModelConfig, placeholder_values, render
from trioserve.sizes import format_size

__all__ = ["MEASURED_MARGIN", "CommandFigures", "MemoryBook", "command_key"]

# Measured beyond the declared or estimated figure by more than this: a warning, and the
# measured figure is used. Below it, a declared figure stands (PSS moves by a few percent as
# pages are touched; the user's figure is the one to plan with).
MEASURED_MARGIN = 0.10


def command_key(config: Config, name: str, model: ModelConfig) -> str:
    """What identifies a model's process for its memory figures. ``{model}`` and
    ``{state_dir}`` are filled (two models sharing a ``cmd`` template serve different files);
    ``{port}``, different at each start, is not."""
    values = placeholder_values(config, name, "{port}")
    return json.dumps(
        {
            "cmd": [render(arg, values) for arg in model.cmd],
            "env": {key: render(value, values) for key, value in sorted(model.env.items())},
            "devices": model.devices,
        }
    )


@dataclass
class CommandFigures:
    """What is known of one command's memory."""

    # The GGUF estimate in bytes (None: no .gguf in the command, or not readable) and its
    # one-line account, or why there is none.
    estimate: int | None = None
    estimate_note: str | None = None
    # The GGUF could not be read (missing, damaged): tried again at the next start or reload.
    estimate_failed: bool = False
    measured: dict[str, int] = field(default_factory=dict)
    # Why a GPU figure could not be measured (no NVML, a process NVML does not list), or None.
    unmeasured: str | None = None

    def estimated(self, config: ModelConfig) -> dict[str, int]:
        """Per device, the figure known before a start: the declared size on each device, or
        the GGUF estimate (split evenly over the GPUs, as llama.cpp splits layers by default;
        on the CPU for a CPU model)."""
        declared = config.declared_memory
        if declared is not None:
            return dict.fromkeys(config.devices, declared)
        if self.estimate is None:
            return {}
        gpus = [device for device in config.devices if device != "cpu"]
        if not gpus:
            return {"cpu": self.estimate}
        share = -(-self.estimate // len(gpus))
        return dict.fromkeys(gpus, share)

    def need(self, config: ModelConfig) -> dict[str, int]:
        """Per device, what placement counts for this model: the measured figure once known
        (for a declared size only when it is over by more than the margin), else the
        estimated one, else 0. A GPU model's measured host memory counts on "cpu"."""
        estimated = self.estimated(config)
        need: dict[str, int] = {}
        for device in config.devices:
            before = estimated.get(device)
            measured = self.measured.get(device)
            if measured is None:
                need[device] = before or 0
            elif before is None or config.declared_memory is None:
                need[device] = measured
            else:
                need[device] = measured if _over(measured, before) else before
        if "cpu" not in need and "cpu" in self.measured:
            need["cpu"] = self.measured["cpu"]
        return need

    def warnings(self, config: ModelConfig, budgets: Mapping[str, int]) -> list[str]:
        """What a user should know about these figures, for the status. An unknown figure
        matters only where a budget would count it."""
        notes: list[str] = []
        estimated = self.estimated(config)
        budgeted = any(device in budgets for device in config.devices)
        if budgeted and not estimated and not self.measured:
            why = f" ({self.estimate_note})" if self.estimate_note else ""
            notes.append(f"memory not yet known: counted as 0 until measured{why}")
        if self.unmeasured is not None:
            notes.append(f"GPU memory not measured: {self.unmeasured}")
        what = "declared" if config.declared_memory is not None else "estimated"
        for device, before in estimated.items():
            measured = self.measured.get(device)
            if measured is not None and _over(measured, before):
                notes.append(
                    f"measured {format_size(measured)} on {device}, "
                    f"{measured / before - 1:.0%} over the {format_size(before)} {what}: "
                    "the measured figure is used"
                )
        return notes


def _over(measured: int, before: int) -> bool:
    return measured > before * (1 + MEASURED_MARGIN)


class MemoryBook:
    """Every command's figures, by ``command_key``."""

    def __init__(self) -> None:
        self._by_command: dict[str, CommandFigures] = {}

    def of(self, key: str) -> CommandFigures:
        return self._by_command.setdefault(key, CommandFigures())

    def estimated_keys(self) -> set[str]:
        """The commands already estimated (or found to have nothing to estimate from); not
        those whose GGUF could not be read: the file may be there by the next reload."""
        return {
            key
            for key, figures in self._by_command.items()
            if figures.estimate_note and not figures.estimate_failed
        }

    def for_model(self, config: Config, name: str, model: ModelConfig) -> CommandFigures:
        return self.of(command_key(config, name, model))

    def needs(self, config: Config) -> dict[str, dict[str, int]]:
        """What each model of ``config`` needs per device before it runs (declared or
        estimated): what a config is checked against (``check_memory_fits``). A measured
        figure does not count: one run's spike must not stop a daemon from starting; it is
        told when that model starts (a 503) instead."""
        return {
            name: self.for_model(config, name, model).estimated(model)
            for name, model in config.models.items()
        }

    def load(self, rows: Iterable[tuple[str, str, int]]) -> None:
        """Measured figures from the state store: (command key, device, bytes)."""
        for key, device, size in rows:
            self._by_command.setdefault(key, CommandFigures()).measured[device] = size
