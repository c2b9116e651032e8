"""`trioserve --version` (CONTRACT: prints `trioserve X.Y.Z` and exits 0)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from trioserve import __version__
from trioserve_cli.main import app


def test_version_flag_prints_the_package_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output == f"trioserve {__version__}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+", __version__)


def test_installed_console_script_prints_the_version() -> None:
    script = Path(sys.executable).parent / "trioserve"
    done = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"trioserve {__version__}\n"
