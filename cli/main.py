"""The ``trioserve`` command: a typer root with one sub-module per command group."""

from __future__ import annotations

import typer

from . import cleanup_cmd, client_cmds, config_cmd, daemon_cmds, status_cmd

__all__ = ["app", "main"]

app = typer.Typer(
    name="trioserve",
    help="Serve local language models to many users at once.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
daemon_cmds.register(app)
status_cmd.register(app)
cleanup_cmd.register(app)
client_cmds.register(app)
app.add_typer(config_cmd.app, name="config")


def main() -> None:
    app()
