"""The ``trioserve`` command: a typer root with one sub-module per command group."""

from __future__ import annotations

from typing import Annotated

import typer

from trioserve import __version__

from . import (
    cleanup_cmd,
    client_cmds,
    config_cmd,
    daemon_cmds,
    mcp_cmd,
    reload_cmd,
    status_cmd,
    ui_cmd,
    users_cmd,
)

__all__ = ["app", "main"]

app = typer.Typer(
    name="trioserve",
    help="Serve local language models to many users at once.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"trioserve {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """Serve local language models to many users at once."""


daemon_cmds.register(app)
status_cmd.register(app)
cleanup_cmd.register(app)
client_cmds.register(app)
reload_cmd.register(app)
users_cmd.register(app)
ui_cmd.register(app)
mcp_cmd.register(app)
app.add_typer(config_cmd.app, name="config")


def main() -> None:
    app()
