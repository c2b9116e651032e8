"""GPU memory used by a model's processes, read through NVML (the ``nvidia-ml-py`` bindings,
imported as ``pynvml``), behind a seam: tests pass a fake module with the library's interface.

Blocking (each NVML call is a driver call): the daemon calls these through
``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

__all__ = ["GpuUsage", "NvmlReader", "nvml_index"]

# Device names as the config writes them. "cuda:N" is read as NVML's device index N, and NVML
# numbers GPUs in PCI bus order, whatever CUDA_VISIBLE_DEVICES says (NVML always sees every
# GPU). CUDA's own numbering, which CUDA_VISIBLE_DEVICES indexes, is "fastest first" unless
# CUDA_DEVICE_ORDER=PCI_BUS_ID: on a machine whose GPUs differ, CUDA's 0 may be NVML's 1. What
# we do: "cuda:N" means NVML's index N everywhere, so a model's child must run with
# CUDA_DEVICE_ORDER=PCI_BUS_ID next to the CUDA_VISIBLE_DEVICES taken from its devices (the
# supervisor sets both), and the GPU it runs on is then the GPU we measure and budget.
_CUDA_PREFIX = "cuda:"


def nvml_index(device: str) -> int | None:
    """NVML's index of ``"cuda:N"`` (N), None for a device that is not a CUDA GPU (``"cpu"``)."""
    if not device.startswith(_CUDA_PREFIX):
        return None
    number = device.removeprefix(_CUDA_PREFIX)
    if not number.isdigit():
        raise ValueError(f"{device!r} is not a CUDA device: write cuda:0, cuda:1, …")
    return int(number)


@dataclass(frozen=True, slots=True)
class GpuUsage:
    """What :meth:`NvmlReader.usage` found.

    ``used``: bytes per device that could be read (0 when none of the processes uses it).
    ``gaps``: per device, why its figure is missing (the device is not in ``used``) or short
    (it is, but some process's memory could not be counted).
    """

    used: dict[str, int] = field(default_factory=dict)
    gaps: dict[str, str] = field(default_factory=dict)


class NvmlReader:
    """GPU memory per process group and device, through NVML when the machine has it.

    ``nvml`` is the ``pynvml`` module (imported on first use when None) or a stand-in with its
    interface. NVML is started at most once: a failure (no driver, no library, no
    ``nvidia-ml-py``) is remembered and its reason kept in ``unavailable_reason``. Safe to call
    from several worker threads at once (NVML itself is thread-safe).
    """

    def __init__(self, nvml: ModuleType | None = None) -> None:
        self._nvml: Any = nvml
        self._lock = threading.Lock()  # one nvmlInit, even from two threads at once
        self._tried = False
        self._initialised = False
        self.unavailable_reason: str | None = None

    def available(self) -> bool:
        """True once NVML has started; False, with ``unavailable_reason``, if it cannot."""
        with self._lock:
            if not self._tried:
                self._tried = True
                self._start()
            return self._initialised

    def _start(self) -> None:
        if self._nvml is None:
            try:
                self._nvml = importlib.import_module("pynvml")
            except ImportError as error:
                self.unavailable_reason = f"nvidia-ml-py is not installed ({error})"
                return
        try:
            self._nvml.nvmlInit()
        except self._nvml.NVMLError as error:
            # NVMLError_LibraryNotFound (no libnvidia-ml.so.1: no driver), DriverNotLoaded,
            # NoPermission, …: its str() is NVML's own words for it.
            self.unavailable_reason = f"NVML cannot start: {error}"
            return
        self._initialised = True

    def used_by(self, pids: set[int], devices: Sequence[str]) -> dict[str, int]:
        """Bytes of GPU memory the processes ``pids`` use on each CUDA device of ``devices``
        (``"cuda:N"``; others such as ``"cpu"`` are left out). A device that cannot be read is
        left out; :meth:`usage` says why."""
        return self.usage(pids, devices).used

    def usage(self, pids: set[int], devices: Sequence[str]) -> GpuUsage:
        """:meth:`used_by`, with the reasons for what could not be counted."""
        usage = GpuUsage()
        cuda: list[tuple[str, int]] = []
        for device in devices:
            try:
                index = nvml_index(device)
            except ValueError as error:
                usage.gaps[device] = str(error)
                continue
            if index is not None:
                cuda.append((device, index))
        if not cuda:
            return usage
        if not self.available():
            for device, _ in cuda:
                usage.gaps[device] = f"not measured: {self.unavailable_reason}"
            return usage
        for device, index in cuda:
            self._read_device(usage, device, index, pids)
        return usage

    def _read_device(self, usage: GpuUsage, device: str, index: int, pids: set[int]) -> None:
        nvml = self._nvml
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            processes = [
                *nvml.nvmlDeviceGetComputeRunningProcesses(handle),
                *self._graphics_processes(handle),
            ]
        except (nvml.NVMLError, nvml.NVMLLibraryMismatchError) as error:
            usage.gaps[device] = f"NVML cannot read {device}: {error}"
            return
        # NVML gives pids as the host's pid namespace sees them: in a container without the
        # host's pid namespace none of them is ours, and the group measures 0 on every GPU.
        # A process with both a compute and a graphics context is in both lists with the same
        # figure (nvidia-smi shows it once, as "C+G"): one figure per process, not a sum.
        by_pid: dict[int, int | None] = {}
        for process in processes:
            if process.pid not in pids:
                continue
            memory = process.usedGpuMemory
            if memory is None:
                by_pid.setdefault(process.pid, None)
            else:
                by_pid[process.pid] = max(by_pid.get(process.pid) or 0, int(memory))
        unknown = sorted(pid for pid, memory in by_pid.items() if memory is None)
        if unknown:
            # NVML has no figure (Windows WDDM, some vGPU and MIG set-ups): we count nothing
            # for these processes rather than guess.
            usage.gaps[device] = (
                f"NVML reports no memory figure for process {_listed(unknown)} on {device}: "
                "counted as 0"
            )
        usage.used[device] = sum(memory or 0 for memory in by_pid.values())

    def _graphics_processes(self, handle: object) -> list[Any]:
        try:
            return list(self._nvml.nvmlDeviceGetGraphicsRunningProcesses(handle))
        except self._nvml.NVMLError_NotSupported:
            return []  # compute-only GPUs (many data-centre ones) have no graphics list

    def close(self) -> None:
        """Shut NVML down if it was started; the reader is unavailable afterwards."""
        with self._lock:
            if self._initialised:
                self._initialised = False
                # An error here leaves nothing to release that NVML did not already let go of.
                with contextlib.suppress(self._nvml.NVMLError):
                    self._nvml.nvmlShutdown()
            self._tried = True
            self.unavailable_reason = self.unavailable_reason or "the NVML reader is closed"


def _listed(pids: Iterable[int]) -> str:
    return ", ".join(str(pid) for pid in pids)
