"""``trioserve users``: per user, requests in flight and queued now, requests and tokens since
the daemon started (the ``users`` of ``GET /admin/status``); with ``--since``, the totals the
state store kept over that span (``GET /admin/usage``), across restarts."""

from __future__ import annotations

import json
from typing import Annotated, Any

import trio
import typer

from .client import ClientError, DaemonClient
from .common import JsonOption, die, make_console
from .tables import usage_table, users_table
from .target import ClientOptions, Target, client_command

__all__ = ["UsersOption", "fetch_status", "fetch_usage", "register", "users"]

# `status --users`: the same table as `users`, through the command that finds the daemon by its
# config too.
UsersOption = Annotated[
    bool, typer.Option("--users", help="only the users table (with --json: only the users)")
]
SinceOption = Annotated[
    str | None,
    typer.Option(
        "--since",
        help="totals from the state store over this span: 30m, 24h, 7d or an ISO date",
        show_default=False,
    ),
]


async def fetch_status(target: Target) -> dict[str, Any]:
    """``/admin/status`` of the daemon at ``target``; a ``ClientError`` when it has no users
    section (not trioserve, or one from before per-user accounting)."""
    async with DaemonClient(target) as api:
        status = await api.get_json("/admin/status")
        where = api.label("/admin/status")
    if not isinstance(status, dict) or not isinstance(status.get("users"), dict):
        raise ClientError(f"{where} has no users (wrong --url, or a trioserve without users?)")
    return status


async def fetch_usage(target: Target, since: str) -> dict[str, Any]:
    """``/admin/usage?since=…``; a ``ClientError`` when the answer is not of its shape (a
    trioserve from before usage was kept)."""
    async with DaemonClient(target) as api:
        response = await api.request("GET", "/admin/usage", params={"since": since})
        where = api.label("/admin/usage")
    try:
        usage = response.json()
    except ValueError:
        usage = None
    if not isinstance(usage, dict) or not isinstance(usage.get("users"), dict):
        raise ClientError(f"{where} did not answer a usage report (is this a trioserve daemon?)")
    return usage


@client_command
def users(client: ClientOptions, since: SinceOption = None, as_json: JsonOption = False) -> None:
    """Per user: requests in flight and queued, requests and tokens since the daemon started;
    with --since, requests and tokens over that span, kept across restarts."""
    target = client.target()
    if since is not None:
        _usage(target, since, as_json)
        return
    try:
        status = trio.run(fetch_status, target)
    except ClientError as exc:
        die(str(exc))
    if as_json:
        typer.echo(json.dumps(status["users"], indent=2))
        return
    make_console().print(users_table(status))


def _usage(target: Target, since: str, as_json: bool) -> None:
    try:
        usage = trio.run(fetch_usage, target, since)
    except ClientError as exc:
        die(str(exc))
    if as_json:
        typer.echo(json.dumps(usage, indent=2))
        return
    out = make_console()
    out.print(f"usage from {usage.get('since')} to {usage.get('until')}", markup=False)
    out.print(usage_table(usage))


def register(app: typer.Typer) -> None:
    app.command("users")(users)
