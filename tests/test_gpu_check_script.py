"""scripts/gpu-check.sh where it can run here: without an NVIDIA driver it stops at once, with
a message that says so (its GPU path needs a GPU; its --bundle needs the network)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu-check.sh"
NO_DRIVER = 2


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        env={**os.environ, "PYTHON": sys.executable, **env},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_without_the_driver_library_the_check_stops_saying_so(tmp_path: Path) -> None:
    missing = tmp_path / "libcuda.so.1"
    done = run_script(GPU_CHECK_LIBCUDA=str(missing), GPU_CHECK_DIR=str(tmp_path / "work"))
    assert done.returncode == NO_DRIVER, done.stderr
    assert f"no NVIDIA driver: {missing} not found" in done.stderr
    # Nothing was set up for a check that cannot run.
    assert not (tmp_path / "work").exists()


def test_on_this_machine_without_a_gpu_it_names_libcuda() -> None:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        pass
    else:
        pytest.skip("this machine has an NVIDIA driver")
    done = run_script()
    assert done.returncode == NO_DRIVER, done.stderr
    assert "no NVIDIA driver: libcuda.so.1 not found" in done.stderr


def test_help_and_an_unknown_argument() -> None:
    helped = run_script("--help")
    assert helped.returncode == 0
    assert "--bundle" in helped.stdout
    refused = run_script("--bundel")
    assert refused.returncode == 1
    assert "unknown argument: --bundel" in refused.stderr
