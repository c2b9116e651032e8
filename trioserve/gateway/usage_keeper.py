"""Usage that survives a restart: ``UsageBook``'s per-hour totals written to the state store
each second, in one batch, never from a request's task; today's totals read back at start.

Rows are per UTC hour, user and model (``host.store.UsageRow``): an hour is small enough for
``/admin/usage?since=30m`` to be answered to the hour, and a team's year of them is a few
hundred thousand rows at most (per minute would be sixty times that, for a precision nothing
asks for). A day is a whole number of hours, so a day's total is exact.

A crash (SIGKILL, OOM) loses what finished since the last write: at most ``FLUSH_INTERVAL``. A
clean stop writes once more.
"""

from __future__ import annotations

import logging
import time

import trio

from trioserve.gateway.usage import UsageBook
from trioserve.host.store import StoreWriter
from trioserve.sharing.budgets import DAY, HOUR

__all__ = ["FLUSH_INTERVAL", "UsageKeeper"]

log = logging.getLogger(__name__)

# How far the state store may be behind: what a crash can lose.
FLUSH_INTERVAL = 1.0
# The last write at a clean stop is shielded; bounded so a dead disk cannot hold the stop.
FINAL_WRITE_LIMIT = 5.0


class UsageKeeper:
    """Moves ``book``'s pending totals into the store through ``writer``."""

    def __init__(self, book: UsageBook, writer: StoreWriter) -> None:
        self.book = book
        self.writer = writer

    async def load(self) -> None:
        """Today's (UTC) tokens per user from the store, into the users' day budgets: for
        every name in it, configured or not, so that a user a reload adds later is counted
        what its name spent today (``Budgets.add_day_tokens``; no store read on a reload)."""
        now = time.time()
        day = int(now // DAY)
        rows = await trio.to_thread.run_sync(self.writer.store.usage, day * DAY // HOUR)
        spent: dict[str, int] = {}
        for row in rows:
            spent[row.user] = spent.get(row.user, 0) + row.prompt_tokens + row.completion_tokens
        self.book.budgets.add_day_tokens(day, spent)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write every ``FLUSH_INTERVAL`` until cancelled, then once more."""
        task_status.started()
        try:
            while True:
                await trio.sleep(FLUSH_INTERVAL)
                await self.flush()
        finally:
            with trio.CancelScope(shield=True) as final:
                final.deadline = trio.current_time() + FINAL_WRITE_LIMIT
                await self.flush()

    async def flush(self) -> None:
        """Write what finished since the last flush, as one transaction. A write that fails
        keeps its rows for the next one (logged, never raised: a full disk must not take
        the daemon down)."""
        rows = self.book.take_pending()
        if not rows:
            return
        store = self.writer.store
        try:
            # Through the writer's lock: one writer thread at a time, in order with the
            # children's rows.
            await self.writer.call(lambda: store.add_usage(rows))
        except trio.Cancelled:
            # Not known to be written (cancelled while waiting for the lock): kept.
            self.book.restore_pending(rows)
            raise
        except Exception:
            log.exception("writing usage to the state store failed; kept for the next write")
            self.book.restore_pending(rows)
