"""``trioserve config check``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from trioserve.config import resolved_dict

from .common import config_path, load_or_exit

app = typer.Typer(help="Check configs.", no_args_is_help=True)


@app.command("check")
def check(
    path: Annotated[
        Path | None, typer.Argument(help="config file (default: TRIOSERVE_CONFIG)")
    ] = None,
) -> None:
    """Validate a config and print it resolved (paths expanded, placeholders filled)."""
    config = load_or_exit(config_path(path))
    typer.echo(json.dumps(resolved_dict(config), indent=2))
    typer.echo(f"{config.source}: ok")
