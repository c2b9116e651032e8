"""``trioserve users``: per user, requests in flight and queued now, requests and tokens since
the daemon started (the ``users`` of ``GET /admin/status``)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import trio
import typer

from .client import ClientError, DaemonClient
from .common import ApiKeyOption, JsonOption, UrlOption, die, make_console
from .tables import users_table

__all__ = ["UsersOption", "fetch_status", "register", "users"]

# `status --users`: the same table as `users`, through the command that finds the daemon by its
# config too.
UsersOption = Annotated[
    bool, typer.Option("--users", help="only the users table (with --json: only the users)")
]


async def fetch_status(url: str | None, api_key: str | None) -> dict[str, Any]:
    """``/admin/status`` of the daemon at ``url``; a ``ClientError`` when it has no users
    section (not trioserve, or one from before per-user accounting)."""
    async with DaemonClient(url, api_key) as client:
        status = await client.get_json("/admin/status")
        where = f"{client.url}/admin/status"
    if not isinstance(status, dict) or not isinstance(status.get("users"), dict):
        raise ClientError(f"{where} has no users (wrong --url, or a trioserve without users?)")
    return status


def users(as_json: JsonOption = False, url: UrlOption = None, api_key: ApiKeyOption = None) -> None:
    """Per user: requests in flight and queued, requests and tokens since the daemon started."""
    try:
        status = trio.run(fetch_status, url, api_key)
    except ClientError as exc:
        die(str(exc))
    if as_json:
        typer.echo(json.dumps(status["users"], indent=2))
        return
    make_console().print(users_table(status))


def register(app: typer.Typer) -> None:
    app.command("users")(users)
