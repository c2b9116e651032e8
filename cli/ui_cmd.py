"""``trioserve ui``: the status page's address, with the local admin token in its fragment when
this account can read it, so the page can make admin calls (load, unload) as its reader.

A fragment (``#token=…``) is never sent to the server, so the token stays out of its logs and
of any proxy's; the page keeps it in ``sessionStorage`` and clears it from the address bar.
The token is put only into the address the state folder's running daemon recorded
(``target.py``): a page served by any other address — the config's own one while no daemon holds
its port included — would be handed the key to this one.
"""

from __future__ import annotations

import webbrowser
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

import typer

from trioserve.host.admin_files import read_admin_token

from .common import DEFAULT_URL, EXIT_FAILURE, ConfigOption, die
from .target import base_url, find_local

__all__ = ["page_url", "register"]

UI_PATH = "/ui"

# Not the client commands' --url: a browser cannot use the admin socket, so it is no default.
PageUrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        envvar="TRIOSERVE_URL",
        help="the daemon's URL; default: the URL of --config's daemon, else " + DEFAULT_URL,
        show_default=False,
    ),
]


def page_url(url: str | None, config_file: Path | None) -> str:
    """The page of the daemon at ``url`` (else the config's), with the token when readable and
    the address is the running daemon's."""
    local = find_local(config_file)
    target = base_url(url) if url else local.url
    page = f"{target}{UI_PATH}"
    # With admin_keys set the token is no key, and the page asks for one itself.
    if local.live_at(target) and not local.admin_keys:
        token = read_admin_token(local.state_dir)
        if token is not None:
            page += f"#token={quote(token, safe='')}"
    return page


def ui(
    open_it: Annotated[
        bool, typer.Option("--open", help="open the page in the default web browser")
    ] = False,
    url: PageUrlOption = None,
    config_file: ConfigOption = None,
) -> None:
    """Print the status page's address (with --open, open it); it carries the local admin
    token, for admin calls from the page, when this account can read it."""
    page = page_url(url, config_file)
    typer.echo(page)
    if open_it and not webbrowser.open(page):
        die("no web browser could be started here: open the address above in one", EXIT_FAILURE)


def register(app: typer.Typer) -> None:
    app.command("ui")(ui)
