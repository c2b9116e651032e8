"""``trioserve config check``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from trioserve.config import check_memory_fits, resolved_dict
from trioserve.errors import ConfigError
from trioserve.memory.estimates import apply_estimates, estimate_models
from trioserve.memory.figures import MemoryBook

from .common import EXIT_USAGE, config_path, die, load_or_exit

app = typer.Typer(help="Check configs.", no_args_is_help=True)


@app.command("check")
def check(
    path: Annotated[
        Path | None, typer.Argument(help="config file (default: TRIOSERVE_CONFIG)")
    ] = None,
) -> None:
    """Validate a config and print it resolved (paths expanded, placeholders filled), with
    each "auto" model's memory estimate from its GGUF."""
    config = load_or_exit(config_path(path))
    book = MemoryBook()
    apply_estimates(book, estimate_models(config, ()))
    try:
        check_memory_fits(config, book.needs(config))
    except ConfigError as exc:
        die(str(exc), EXIT_USAGE)
    typer.echo(json.dumps(resolved_dict(config), indent=2))
    for name, model in config.models.items():
        figures = book.for_model(config, name, model)
        # On stderr: stdout is the resolved config, for machines.
        if figures.estimate is not None:
            typer.echo(f"models.{name}.memory: auto: {figures.estimate_note}", err=True)
    typer.echo(f"{config.source}: ok")
