"""Who is calling: the caller of the /mcp request being handled, for the tools and views.

The endpoint sets ``CALLER`` in the HTTP request's task before handing the request to the SDK;
the SDK carries the sender's context into the task that runs each handler (mcp 2.3:
``shared/_context_streams.py``), so a tool sees the identity of the request that carried it.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from trioserve.sharing.identity import User

__all__ = ["CALLER", "Caller", "caller", "model_view"]


@dataclass(frozen=True, slots=True)
class Caller:
    """The user a call is made as (for admission, budgets, usage) and whether it is admin."""

    user: User
    admin: bool
    headers: tuple[tuple[bytes, bytes], ...] = ()  # the key headers, passed on to the relay
    client: tuple[str, int] | None = None


CALLER: ContextVar[Caller | None] = ContextVar("trioserve_mcp_caller", default=None)


def caller() -> Caller:
    """The current caller; a request that reached no endpoint has none (tests of handlers)."""
    found = CALLER.get()
    if found is None:
        raise LookupError("no MCP caller in this context")
    return found


# What a session that is not admin sees of a model: /admin keeps the rest (pid, port, the
# child's last lines in a failure, which can hold prompt text) behind admin when admin_keys
# are set, and MCP must not open that door.
_SHOWN_TO_USERS = ("state", "in_flight", "queued", "last_error")


def model_view(status: dict[str, Any], *, admin: bool) -> dict[str, Any]:
    """A model's status as this caller may see it: whole for an admin; else its state,
    in flight, queued, and only the first line of its last error."""
    if admin:
        return status
    shown = {key: status[key] for key in _SHOWN_TO_USERS if key in status}
    error = shown.get("last_error")
    if isinstance(error, str):
        shown["last_error"] = error.splitlines()[0] if error else error
    return shown
