"""One measurement of a model's process group: host memory and, for GPU models, GPU memory."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from trioserve.memory.measure import group_pids, host_memory
from trioserve.memory.nvml import NvmlReader

__all__ = ["Sample", "measure_group"]


@dataclass(frozen=True)
class Sample:
    """Bytes per device ("cpu": the group's PSS; "cuda:N": what NVML reports for the group's
    processes), and why a GPU figure is missing or short (None when nothing is)."""

    used: dict[str, int]
    gaps: str | None = None


def measure_group(pgid: int, gpus: Sequence[str], nvml: NvmlReader) -> Sample:
    """Blocking: what process group ``pgid`` uses now."""
    used = {"cpu": host_memory(pgid)}
    if not gpus:
        return Sample(used)
    usage = nvml.usage(group_pids(pgid), gpus)
    used.update(usage.used)
    gaps = "; ".join(f"{device}: {why}" for device, why in usage.gaps.items())
    return Sample(used, gaps or None)
