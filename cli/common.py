"""Shared CLI bits: options, exit codes, consoles, config loading, one-line errors."""

from __future__ import annotations

import os
import sqlite3
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from trioserve.config import Config, load_config
from trioserve.errors import ConfigError

__all__ = [
    "EXIT_FAILURE",
    "EXIT_NO_DAEMON",
    "EXIT_OK",
    "EXIT_USAGE",
    "ApiKeyOption",
    "CaCertOption",
    "ClientCertOption",
    "ClientKeyOption",
    "ConfigOption",
    "JsonOption",
    "UrlOption",
    "config_path",
    "die",
    "load_or_exit",
    "make_console",
    "store_errors",
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2  # a usage or config error (click uses 2 for usage errors too)
EXIT_NO_DAEMON = 3  # `status` only: no daemon answers

DEFAULT_CONFIG = "conf/trioserve.toml"
DEFAULT_URL = "http://127.0.0.1:8600"
# Wide enough for the status table when output goes to a file or a pipe, where rich would
# otherwise assume 80 columns and fold every row.
_PIPE_WIDTH = 200

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        envvar="TRIOSERVE_CONFIG",
        help="config file (TOML); default conf/trioserve.toml",
        show_default=False,
    ),
]
UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        envvar="TRIOSERVE_URL",
        help="the daemon's URL, used as given (never swapped for the admin socket); default: "
        f"the admin socket, else the URL of --config's daemon, else {DEFAULT_URL}",
        show_default=False,
    ),
]
ApiKeyOption = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="TRIOSERVE_API_KEY",
        help="bearer key for the daemon (one of its admin_keys / api_keys); without it, admin "
        "calls to the URL that --config's running daemon recorded carry its admin key or local "
        "admin token",
        show_default=False,
    ),
]
CaCertOption = Annotated[
    Path | None,
    typer.Option(
        "--ca-cert",
        envvar="TRIOSERVE_CA_CERT",
        help="https:// URLs: the CA (PEM) that signed the daemon's certificate (default: the "
        "system's CAs)",
        show_default=False,
    ),
]
ClientCertOption = Annotated[
    Path | None,
    typer.Option(
        "--client-cert",
        envvar="TRIOSERVE_CLIENT_CERT",
        help="https:// URLs: this client's certificate (PEM; may hold the key too)",
        show_default=False,
    ),
]
ClientKeyOption = Annotated[
    Path | None,
    typer.Option(
        "--client-key",
        envvar="TRIOSERVE_CLIENT_KEY",
        help="https:// URLs: the private key of --client-cert (PEM)",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON for machines")]


def make_console(*, stderr: bool = False) -> Console:
    """A console on the current stdout/stderr (made per command, so tests' capture works)."""
    file = sys.stderr if stderr else sys.stdout
    interactive = file.isatty()
    width = None if interactive or os.environ.get("COLUMNS") else _PIPE_WIDTH
    # soft_wrap: a long line is left to the terminal to wrap, never cut into two by rich.
    return Console(file=file, highlight=False, width=width, soft_wrap=True)


def die(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    """Print ``trioserve: message`` on stderr and exit with ``code``; no traceback.

    The first line is the error. Any further lines (a model's last output, quoted by the daemon
    in its error) follow indented, so the error itself stays one line to read or grep.
    """
    first, *rest = message.strip().splitlines() or [""]
    typer.echo(f"trioserve: {first}", err=True)
    for line in rest:
        typer.echo(f"  {line}", err=True)
    raise typer.Exit(code)


def config_path(path: Path | None) -> Path:
    if path is not None:
        return path
    return Path(os.environ.get("TRIOSERVE_CONFIG") or DEFAULT_CONFIG)


def load_if_valid(path: Path | None) -> tuple[Config | None, str | None]:
    """The config at ``path`` (or TRIOSERVE_CONFIG, or the default) and None; or None and why
    it is invalid."""
    try:
        return load_config(config_path(path)), None
    except ConfigError as exc:
        return None, str(exc)


def load_or_exit(path: Path | None) -> Config:
    """The config at ``path`` (or TRIOSERVE_CONFIG, or the default); exit 2 if invalid."""
    try:
        return load_config(config_path(path))
    except ConfigError as exc:
        die(str(exc), EXIT_USAGE)


@contextmanager
def store_errors(state_dir: Path) -> Iterator[None]:
    """Turn an unreadable state store (permissions, a corrupt file) into one line and exit 1."""
    try:
        yield
    except (sqlite3.Error, OSError) as exc:
        die(f"cannot use the state store in {state_dir}: {exc}")
