"""GPU memory through NVML (trioserve.memory.nvml), against a fake NVML module with the
library's interface; the fake is checked against the real ``pynvml`` so that it cannot drift."""

from __future__ import annotations

import ctypes
import importlib
import inspect
import sys
import threading
import types
from dataclasses import dataclass, field
from typing import ClassVar

import pytest

from trioserve.memory.nvml import NvmlReader, nvml_index

MIB = 2**20

# The library the fake stands in for (no type stubs: imported as a plain module).
pynvml = importlib.import_module("pynvml")


@dataclass
class Gpu:
    """One device of the fake: its processes (pid, usedGpuMemory) per list, or the NVML error
    reading a list raises."""

    compute: list[tuple[int, int | None]] = field(default_factory=list)
    graphics: list[tuple[int, int | None]] | type[Exception] = field(default_factory=list)


class FakeNvml(types.ModuleType):
    """``pynvml``'s interface, as the reader uses it: the names starting with ``nvml`` or
    ``NVML`` must exist in ``pynvml`` with the same parameters (checked below).

    As in ``pynvml``, each NVML error code has its ``NVMLError`` subclass, raised without
    arguments, and the process lists hold ``nvmlFriendlyObject``s with ``pid`` and
    ``usedGpuMemory`` (None when NVML has no figure).
    """

    NVML_ERROR_INVALID_ARGUMENT = 2
    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_DRIVER_NOT_LOADED = 9
    NVML_ERROR_LIBRARY_NOT_FOUND = 12
    NVML_ERROR_GPU_IS_LOST = 15

    class NVMLError(Exception):
        # pynvml's own words for these codes (NVMLError._errcode_to_string).
        _strings: ClassVar[dict[int, str]] = {
            2: "Invalid Argument",
            3: "Not Supported",
            9: "Driver Not Loaded",
            12: "NVML Shared Library Not Found",
            15: "GPU is lost",
        }

        def __init__(self, value: int) -> None:
            super().__init__(value)
            self.value = value

        def __str__(self) -> str:
            return self._strings[self.value]

    class NVMLError_InvalidArgument(NVMLError):
        def __init__(self) -> None:
            super().__init__(2)

    class NVMLError_NotSupported(NVMLError):
        def __init__(self) -> None:
            super().__init__(3)

    class NVMLError_DriverNotLoaded(NVMLError):
        def __init__(self) -> None:
            super().__init__(9)

    class NVMLError_LibraryNotFound(NVMLError):
        def __init__(self) -> None:
            super().__init__(12)

    class NVMLError_GpuIsLost(NVMLError):
        def __init__(self) -> None:
            super().__init__(15)

    class NVMLLibraryMismatchError(Exception):
        pass

    class nvmlFriendlyObject:
        def __init__(self, dictionary: dict[str, object]) -> None:
            for key, value in dictionary.items():
                setattr(self, key, value)

    def __init__(self, gpus: list[Gpu], init_error: type[Exception] | None = None) -> None:
        super().__init__("fake_pynvml")
        self.gpus = gpus
        self.init_error = init_error
        self.init_calls = 0
        self.shutdown_calls = 0

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise self.init_error()

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Gpu:
        if not 0 <= index < len(self.gpus):
            raise self.NVMLError_InvalidArgument()
        return self.gpus[index]

    def _processes(self, listed: list[tuple[int, int | None]]) -> list[object]:
        return [
            self.nvmlFriendlyObject({"pid": pid, "usedGpuMemory": used}) for pid, used in listed
        ]

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Gpu) -> list[object]:
        return self._processes(handle.compute)

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: Gpu) -> list[object]:
        if isinstance(handle.graphics, type):
            raise handle.graphics()
        return self._processes(handle.graphics)


FAKE_NAMES = sorted(name for name in vars(FakeNvml) if name.startswith(("nvml", "NVML")))


def test_the_fake_has_only_names_the_real_pynvml_has_with_the_same_parameters() -> None:
    for name in FAKE_NAMES:
        assert hasattr(pynvml, name), f"pynvml has no {name}: the fake drifted from the library"
    fake = FakeNvml([])
    for name in FAKE_NAMES:
        ours, theirs = getattr(fake, name), getattr(pynvml, name)
        if name.startswith("NVML_ERROR_"):
            assert ours == theirs, name
        elif name.startswith("NVMLError"):
            assert issubclass(theirs, pynvml.NVMLError), name
        elif inspect.isfunction(theirs):
            assert list(inspect.signature(ours).parameters) == list(
                inspect.signature(theirs).parameters
            ), name
    for code, words in FakeNvml.NVMLError._strings.items():
        assert str(pynvml.NVMLError(code)) == words
        # pynvml maps a code to its subclass, as the fake raises it.
        assert type(pynvml.NVMLError(code)).__name__ == type(_fake_error(code)).__name__


def _fake_error(code: int) -> FakeNvml.NVMLError:
    errors: list[FakeNvml.NVMLError] = [
        cls() for name, cls in vars(FakeNvml).items() if name.startswith("NVMLError_")
    ]
    return next(error for error in errors if error.value == code)


def test_memory_of_the_pids_per_device_others_left_out() -> None:
    fake = FakeNvml(
        [
            Gpu(compute=[(100, 1024 * MIB), (101, 512 * MIB), (999, 2048 * MIB)]),
            Gpu(graphics=[(100, 256 * MIB)]),
            Gpu(compute=[(999, 4096 * MIB)]),
        ]
    )
    reader = NvmlReader(fake)
    used = reader.used_by({100, 101}, ["cuda:0", "cuda:1", "cuda:2", "cpu"])
    # cuda:2 holds nothing of ours: a known 0; "cpu" is not NVML's.
    assert used == {"cuda:0": 1536 * MIB, "cuda:1": 256 * MIB, "cuda:2": 0}
    assert reader.usage({100, 101}, ["cuda:0"]).gaps == {}
    assert fake.init_calls == 1


def test_a_process_in_both_lists_is_counted_once() -> None:
    fake = FakeNvml([Gpu(compute=[(100, 700 * MIB)], graphics=[(100, 700 * MIB)])])
    assert NvmlReader(fake).used_by({100}, ["cuda:0"]) == {"cuda:0": 700 * MIB}


def test_a_process_without_a_memory_figure_counts_nothing_and_says_so() -> None:
    fake = FakeNvml([Gpu(compute=[(100, None), (101, 300 * MIB)])])
    usage = NvmlReader(fake).usage({100, 101}, ["cuda:0"])
    assert usage.used == {"cuda:0": 300 * MIB}
    assert usage.gaps == {
        "cuda:0": "NVML reports no memory figure for process 100 on cuda:0: counted as 0"
    }


def test_a_gpu_without_a_graphics_list_is_read_from_its_compute_list() -> None:
    fake = FakeNvml([Gpu(compute=[(100, 64 * MIB)], graphics=FakeNvml.NVMLError_NotSupported)])
    usage = NvmlReader(fake).usage({100}, ["cuda:0"])
    assert (usage.used, usage.gaps) == ({"cuda:0": 64 * MIB}, {})


def test_a_device_nvml_cannot_read_is_left_out_with_the_reason() -> None:
    fake = FakeNvml([Gpu(compute=[(100, 64 * MIB)]), Gpu(graphics=FakeNvml.NVMLError_GpuIsLost)])
    usage = NvmlReader(fake).usage({100}, ["cuda:0", "cuda:1", "cuda:7", "cuda:x"])
    assert usage.used == {"cuda:0": 64 * MIB}
    assert usage.gaps == {
        "cuda:1": "NVML cannot read cuda:1: GPU is lost",
        "cuda:7": "NVML cannot read cuda:7: Invalid Argument",
        "cuda:x": "'cuda:x' is not a CUDA device: write cuda:0, cuda:1, …",
    }


def test_nvml_that_cannot_start_is_tried_once_and_says_why() -> None:
    fake = FakeNvml([Gpu(compute=[(100, 64 * MIB)])], init_error=FakeNvml.NVMLError_DriverNotLoaded)
    reader = NvmlReader(fake)
    assert not reader.available()
    assert not reader.available()
    assert fake.init_calls == 1
    assert reader.unavailable_reason == "NVML cannot start: Driver Not Loaded"
    usage = reader.usage({100}, ["cuda:0", "cpu"])
    assert usage.used == {}
    assert usage.gaps == {"cuda:0": "not measured: NVML cannot start: Driver Not Loaded"}
    reader.close()
    assert fake.shutdown_calls == 0


def test_nvml_starts_once_from_many_threads_and_close_shuts_it_down_once() -> None:
    fake = FakeNvml([Gpu()])
    reader = NvmlReader(fake)
    threads = [threading.Thread(target=reader.available) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert fake.init_calls == 1
    reader.close()
    reader.close()
    assert fake.shutdown_calls == 1
    assert not reader.available()
    assert fake.init_calls == 1


def test_only_cpu_devices_need_no_nvml() -> None:
    fake = FakeNvml([], init_error=FakeNvml.NVMLError_LibraryNotFound)
    reader = NvmlReader(fake)
    assert reader.usage({100}, ["cpu"]).used == {}
    assert fake.init_calls == 0


def test_without_nvidia_ml_py_it_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # what an absent package looks like
    reader = NvmlReader()
    assert not reader.available()
    assert reader.unavailable_reason is not None
    assert reader.unavailable_reason.startswith("nvidia-ml-py is not installed")


def test_the_real_pynvml_on_a_machine_without_nvml_is_unavailable_with_a_reason() -> None:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        pass
    else:
        pytest.skip("this machine has NVML (an NVIDIA driver)")
    reader = NvmlReader()
    assert not reader.available()
    assert reader.unavailable_reason == "NVML cannot start: NVML Shared Library Not Found"
    assert reader.used_by({1}, ["cuda:0"]) == {}
    reader.close()


def test_device_names() -> None:
    assert nvml_index("cuda:0") == 0
    assert nvml_index("cuda:12") == 12
    assert nvml_index("cpu") is None
    with pytest.raises(ValueError, match="not a CUDA device"):
        nvml_index("cuda:")
