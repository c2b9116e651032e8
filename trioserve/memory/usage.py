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
    gaps = dict(usage.gaps)
    for device, size in usage.used.items():
        if size:
            used[device] = size
        else:
            # A model on this GPU that NVML sees no memory of is not measured as using none:
            # in a container without the host's pid namespace NVML lists other pids than ours.
            gaps.setdefault(device, "NVML lists none of its processes on this GPU")
    text = "; ".join(f"{device}: {why}" for device, why in gaps.items())
    return Sample(used, text or None)
