"""``trioserve status``: the daemon's models, or what the state store says a dead one left."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import trio
import typer
from rich.console import Console

from trioserve.config import Config
from trioserve.host.cleanup import Leftover, find_leftovers
from trioserve.host.running import live_daemon
from trioserve.host.store import DaemonRow, StateStore

from .client import ClientError, DaemonClient, NoDaemon
from .common import EXIT_NO_DAEMON, EXIT_USAGE, JsonOption, die, make_console
from .tables import devices_table, duration, leftovers_table, models_table, users_table
from .target import ClientOptions, Target, client_command
from .users_cmd import UsersOption

__all__ = ["register"]


async def _fetch(target: Target) -> dict[str, Any]:
    async with DaemonClient(target) as api:
        status = await api.get_json("/admin/status")
        where = api.label("/admin/status")
    if not isinstance(status, dict) or "models" not in status:
        raise ClientError(f"{where} is not a trioserve status (wrong --url?)")
    return status


def _daemon_dict(row: DaemonRow | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {"pid": row.pid, "instance": row.instance, "url": row.url, "started_at": row.started_at}


def _no_daemon(url: str, config: Config | None, config_error: str | None, as_json: bool) -> None:
    """Say no daemon answers, list what the state store still records, exit 3."""
    running: DaemonRow | None = None
    leftovers: list[Leftover] = []
    state_dir = str(config.state_dir) if config is not None else None
    if config is not None:
        store = StateStore(config.state_dir)
        try:
            running = live_daemon(store)
            leftovers = find_leftovers(store, live=running.instance if running else None)
        except (sqlite3.Error, OSError) as exc:
            config_error = f"{config.state_dir}: {exc}"
            config = None
    if as_json:
        report = {
            "daemon": None,
            "url": url,
            "state_dir": state_dir,
            "error": config_error,
            "running_daemon": _daemon_dict(running),
            "leftovers": [item.as_dict() for item in leftovers],
        }
        typer.echo(json.dumps(report, indent=2))
        raise typer.Exit(EXIT_NO_DAEMON)
    out = make_console()
    out.print(f"no daemon answers at {url}", markup=False)
    if config is None:
        out.print(f"cannot look in the state store: {config_error}", markup=False)
        raise typer.Exit(EXIT_NO_DAEMON)
    if running is not None:
        out.print(
            f"a daemon is running for {config.state_dir}: pid {running.pid}, {running.url} "
            f"(instance {running.instance}); try --url {running.url}",
            markup=False,
        )
    alive = [item for item in leftovers if item.alive]
    if not leftovers:
        out.print(f"the state store ({config.state_dir}) records no model process", markup=False)
    else:
        out.print(f"the state store ({config.state_dir}) records:", markup=False)
        out.print(leftovers_table(leftovers))
        if alive:
            out.print(
                f"{len(alive)} model process(es) still running without a daemon: "
                "`trioserve cleanup` kills them",
                markup=False,
            )
    raise typer.Exit(EXIT_NO_DAEMON)


@client_command
def status(
    client: ClientOptions, as_json: JsonOption = False, users_only: UsersOption = False
) -> None:
    """Show the daemon's models and users; exit 3 (listing leftovers) when no daemon answers."""
    target = client.target()
    config, config_error = target.local.config, target.local.config_error
    if client.config_file is not None and config is None:
        # Named on purpose and invalid: said at once. The default one may be absent: status
        # works without any config while a daemon answers.
        die(config_error or f"{client.config_file}: invalid", EXIT_USAGE)
    try:
        answer = trio.run(_fetch, target)
    except NoDaemon:
        _no_daemon(target.url, config, config_error, as_json)
    except ClientError as exc:
        die(str(exc))
    has_users = isinstance(answer.get("users"), dict)
    if users_only and not has_users:
        die(f"the daemon at {target.where} has no users (a trioserve without users?)")
    if as_json:
        typer.echo(json.dumps(answer["users"] if users_only else answer, indent=2))
        return
    out = make_console()
    if users_only:
        out.print(users_table(answer))
        return
    out.print(
        f"trioserve {answer.get('version', '?')} at {target.url}: pid {answer.get('pid')}, "
        f"instance {answer.get('instance')}, up {duration(answer.get('uptime_s'))}",
        markup=False,
    )
    out.print(models_table(answer))
    _print_memory(out, answer)
    if has_users:
        out.print(users_table(answer))


def _print_memory(out: Console, answer: dict[str, Any]) -> None:
    """The devices' budgets (when there are any), then a line per model that waits and per
    warning: ``b: waiting for memory: needs …``."""
    devices = answer.get("devices") or {}
    if devices:
        out.print(devices_table(answer))
    for name, model in (answer.get("models") or {}).items():
        if model.get("waiting_for"):
            out.print(f"{name}: {model['waiting_for']}", markup=False)
        for warning in model.get("warnings") or []:
            out.print(f"{name}: {warning}", markup=False, style="yellow")


def register(app: typer.Typer) -> None:
    app.command("status")(status)
