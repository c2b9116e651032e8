"""``trioserve start`` (and the commands that find the daemon through the state store)."""

from __future__ import annotations

import logging
from typing import Annotated

import trio
import typer

from trioserve.config import Config
from trioserve.daemon import DaemonError, run_daemon
from trioserve.store import InstanceLocked

from .common import ConfigOption, die, load_or_exit

__all__ = ["register"]


def _with_overrides(config: Config, host: str | None, port: int | None) -> Config:
    server = config.server.model_copy(
        update={k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    )
    updated = config.model_copy(update={"server": server})
    updated._source = config.source
    return updated


def start(
    config_file: ConfigOption = None,
    host: Annotated[str | None, typer.Option(help="listen address (overrides the config)")] = None,
    port: Annotated[int | None, typer.Option(help="listen port (overrides the config)")] = None,
    insecure: Annotated[
        bool, typer.Option(help="allow a non-loopback host without api_keys")
    ] = False,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
) -> None:
    """Run the daemon in the foreground (systemd notify when NOTIFY_SOCKET is set)."""
    config = _with_overrides(load_or_exit(config_file), host, port)
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        trio.run(lambda: run_daemon(config, insecure=insecure))
    except (DaemonError, InstanceLocked) as exc:
        die(str(exc), 1)
    except KeyboardInterrupt:
        # A second Ctrl-C: children were still stopped by their shielded cleanup.
        raise typer.Exit(130) from None


def register(app: typer.Typer) -> None:
    app.command("start")(start)
