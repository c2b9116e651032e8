"""Shared CLI bits: options, config loading, one-line errors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from trioserve.config import Config, load_config
from trioserve.errors import ConfigError

__all__ = [
    "ApiKeyOption",
    "ConfigOption",
    "UrlOption",
    "die",
    "err_console",
    "load_or_exit",
    "out_console",
]

DEFAULT_CONFIG = "conf/trioserve.toml"
DEFAULT_URL = "http://127.0.0.1:8600"

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", envvar="TRIOSERVE_CONFIG", help="config file (TOML)"),
]
UrlOption = Annotated[str, typer.Option("--url", envvar="TRIOSERVE_URL", help="the daemon's URL")]
ApiKeyOption = Annotated[
    str | None,
    typer.Option("--api-key", envvar="TRIOSERVE_API_KEY", help="bearer key for the daemon"),
]

out_console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def die(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"trioserve: {message}", markup=False)
    raise typer.Exit(code)


def config_path(path: Path | None) -> Path:
    if path is not None:
        return path
    return Path(os.environ.get("TRIOSERVE_CONFIG") or DEFAULT_CONFIG)


def load_or_exit(path: Path | None) -> Config:
    try:
        return load_config(config_path(path))
    except ConfigError as exc:
        die(str(exc), 2)
