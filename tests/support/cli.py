"""The command line in tests: commands through typer's CliRunner, and the installed console
script."""

from __future__ import annotations

import subprocess

from typer.testing import CliRunner, Result

from tests.support.daemon import STEERING_ENV, TRIOSERVE_BIN, clean_env
from trioserve_cli.main import app


def invoke(args: list[str], *, input: str | None = None, **env: str | None) -> Result:
    """``trioserve ARGS`` through CliRunner (``input`` on its stdin), the steering variables
    unset unless ``env`` sets them."""
    unset: dict[str, str | None] = dict.fromkeys(STEERING_ENV)
    return CliRunner().invoke(app, args, input=input, env={**unset, **env})


def error_line(result: Result) -> str:
    """The first line a failed command wrote to stderr (never a traceback)."""
    assert "Traceback" not in result.output
    return result.stderr.strip().splitlines()[0]


def run_trioserve(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """The installed console script, as a user runs it (in ``clean_env()``)."""
    return subprocess.run(
        [str(TRIOSERVE_BIN), *args],
        env=clean_env(),
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
