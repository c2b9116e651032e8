"""Real programs some tests need (from Debian's packages), found on PATH or the test stops."""

from __future__ import annotations

import os
import shutil

import pytest

__all__ = ["in_ci", "required_program"]


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def required_program(command: str, package: str) -> str:
    """The path of ``command``. Missing: the test fails in CI (whose ``.ci/run`` installs it,
    so a missing one is a broken install step) and is skipped elsewhere, saying how to get it."""
    path = shutil.which(command)
    if path is not None:
        return path
    hint = f"scripts/ensure-command.sh {command} {package}"
    if in_ci():
        pytest.fail(f"{command} is not installed but CI is set; CI must run {hint} first")
    pytest.skip(f"{command} not installed ({hint} installs it)")
