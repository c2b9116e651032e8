"""``trioserve cleanup``: kill model processes left by a daemon that is no longer running."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from trioserve.config import Config
from trioserve.host.cleanup import NOT_KILLED, find_leftovers, kill_leftovers
from trioserve.host.running import live_daemon
from trioserve.host.store import StateStore

from .common import (
    EXIT_FAILURE,
    EXIT_USAGE,
    ConfigOption,
    die,
    load_or_exit,
    make_console,
    store_errors,
)
from .tables import leftovers_table

__all__ = ["register"]


def _stdin_is_terminal() -> bool:
    # A function of its own so tests can stand in for a terminal.
    return sys.stdin.isatty()


def cleanup(
    config_file: ConfigOption = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="only list what would be killed")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="kill without asking")] = False,
) -> None:
    """Kill model processes left by a daemon that is no longer running.

    Each is proven by pid + start time + boot id from the state store, or by its
    TRIOSERVE_INSTANCE marker. A running daemon's children and reused pids are never touched.
    """
    config = load_or_exit(config_file)
    with store_errors(config.state_dir):
        _cleanup(config, dry_run=dry_run, yes=yes)


def _cleanup(config: Config, *, dry_run: bool, yes: bool) -> None:
    state_dir = config.state_dir
    store = StateStore(state_dir)
    running = live_daemon(store)
    leftovers = find_leftovers(store, live=running.instance if running is not None else None)
    out = make_console()
    if running is not None:
        out.print(
            f"a daemon is running for {state_dir} (pid {running.pid}, {running.url}): "
            "its models are left alone",
            markup=False,
        )
    if not leftovers:
        out.print(f"nothing to clean up for {state_dir}", markup=False)
        return
    killable = [item for item in leftovers if item.proven and item.alive]
    out.print(f"found in {state_dir}:", markup=False)
    out.print(leftovers_table(leftovers))
    if dry_run:
        out.print(
            f"dry run: would kill {len(killable)} process group(s)"
            if killable
            else "dry run: nothing to kill",
            markup=False,
        )
        return
    if killable and not yes:
        if not _stdin_is_terminal():
            die(
                f"refusing to kill {len(killable)} process group(s) without confirmation: stdin "
                "is not a terminal; pass --yes (or --dry-run to only list them)",
                EXIT_USAGE,
            )
        if not typer.confirm(f"Kill {len(killable)} process group(s)?", default=False):
            out.print("nothing killed", markup=False)
            raise typer.Exit(EXIT_FAILURE)
    results = kill_leftovers(store, leftovers, grace=config.supervisor.stop_grace)
    if killable:
        out.print(leftovers_table(results, outcome=True))
    failed = [item for item in results if item.outcome == NOT_KILLED]
    if failed:
        die(
            f"{len(failed)} process group(s) could not be killed: "
            + ", ".join(f"{item.model} pid {item.pid}" for item in failed)
        )
    killed = sum(1 for item in results if item.outcome.startswith("killed"))
    out.print(
        f"killed {killed} process group(s); nothing is left" if killed else "nothing to kill",
        markup=False,
    )


def register(app: typer.Typer) -> None:
    app.command("cleanup")(cleanup)
