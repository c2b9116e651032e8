"""Who is calling: the caller of the /mcp request being handled, for the tools and views.

The endpoint sets ``CALLER`` in the HTTP request's task before handing the request to the SDK;
the SDK carries the sender's context into the task that runs each handler (mcp 2.3:
``shared/_context_streams.py``), so a tool sees the identity of the request that carried it.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

from trioserve.sharing.identity import User

__all__ = ["CALLER", "Caller", "caller"]


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
