"""Open sessions: the one subclass of the SDK's session manager, and what trioserve keeps per
session (its ``ServerSession`` for notifications, its log level, its subscriptions).

The subclass is the only place that touches the SDK's insides (mcp 2.3, pinned ``<2.4``):
``_discard_session`` is the one hook that sees every end of a session (DELETE, idle timeout,
a crash, a refused opening request, the stop), and ``_server_instances`` the one count of
open sessions. ``tests/test_mcp_sdk_coupling.py`` fails naming what changed when an upgrade
changes either.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import trio
from mcp.server.session import ServerSession
from mcp.server.streamable_http import StreamableHTTPServerTransport
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.subscriptions import InMemorySubscriptionBus, ResourceUpdated, ToolsListChanged
from mcp.shared.exceptions import MCPDeprecationWarning

__all__ = ["LOG_LEVELS", "SDK_FINGERPRINTS", "Sessions", "TrioserveSessionManager"]

log = logging.getLogger(__name__)

# sha256 of ``ast.dump(ast.parse(textwrap.dedent(inspect.getsource(obj))))`` of the mcp 2.3.0
# code ``TrioserveSessionManager`` relies on: the method it overrides, and the two that fill
# and read ``_server_instances`` (admission and lookup). When an upgrade changes one, re-read
# it, bring the subclass in line, then update the value here.
SDK_FINGERPRINTS = {
    "StreamableHTTPSessionManager._discard_session": (
        "9c1441e6aa12192451efb2e122946ce84fd35d10ec8825888e49b7a19f6103ec"
    ),
    "StreamableHTTPSessionManager._admit_session": (
        "a7a968a9f2be14680ebb49364b8a6715e5caa521fef88fc725ba8ac5bb157fbb"
    ),
    "StreamableHTTPSessionManager._handle_stateful_request": (
        "d1fc2334ac6d6f9142ac5132922d72a2d577e362eaec7617cbc6b1c650b8349b"
    ),
}

# MCP's log levels (RFC 5424 order).
LOG_LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")


@dataclass
class Sessions:
    """Per open session: its ``ServerSession`` (from ``notifications/initialized``), its log
    level (``logging/setLevel``) and subscribed URIs; and the calls in flight over all."""

    bus: InMemorySubscriptionBus = field(default_factory=InMemorySubscriptionBus)
    by_id: dict[str, ServerSession] = field(default_factory=dict)
    log_level: dict[str, str] = field(default_factory=dict)
    subscriptions: dict[str, set[str]] = field(default_factory=dict)
    calls_in_flight: int = 0

    def forget(self, session_id: str) -> None:
        """Idempotent: the SDK discards a session up to three times."""
        self.by_id.pop(session_id, None)
        self.log_level.pop(session_id, None)
        self.subscriptions.pop(session_id, None)

    async def tools_changed(self) -> None:
        """``notifications/tools/list_changed`` to every session (on its GET stream; dropped
        by the SDK when it has none open) and to 2026-07-28 ``subscriptions/listen``."""
        await self.bus.publish(ToolsListChanged())
        for session in list(self.by_id.values()):
            await _quietly(session.send_tool_list_changed())

    async def resource_updated(self, uri: str) -> None:
        await self.bus.publish(ResourceUpdated(uri=uri))
        for session_id, uris in list(self.subscriptions.items()):
            session = self.by_id.get(session_id)
            if uri in uris and session is not None:
                await _quietly(session.send_resource_updated(uri))

    async def log(self, level: str, data: Any) -> None:
        """A log notification to each session that asked for ``level`` or lower."""
        rank = LOG_LEVELS.index(level)
        for session_id, session in list(self.by_id.items()):
            wanted = self.log_level.get(session_id)
            if wanted is None or rank < LOG_LEVELS.index(wanted):
                continue
            with warnings.catch_warnings():
                # Deprecated as of 2026-07-28, still the way for the handshake versions.
                warnings.simplefilter("ignore", MCPDeprecationWarning)
                sending = session.send_log_message(level, data, logger="trioserve")  # type: ignore[arg-type]
            await _quietly(sending)


# A session whose client does not read its stream gets this long per notification: one slow
# client must not hold every other session's notifications (and the model watch) behind it.
NOTIFY_WITHIN = 1.0


async def _quietly(sending: Any) -> None:
    """A notification to one session: a session that is going away, or whose client does not
    read, must not stop the rest."""
    try:
        with trio.move_on_after(NOTIFY_WITHIN) as late:
            await sending
        if late.cancelled_caught:
            log.debug("mcp notification dropped: the session's client is not reading")
    except Exception as exc:  # anyio's closed/broken stream errors, whatever the transport
        log.debug("mcp notification not delivered: %r", exc)


class TrioserveSessionManager(StreamableHTTPSessionManager):
    """The SDK's manager, with the end of each session reported to ``Sessions``."""

    def __init__(self, sessions: Sessions, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sessions = sessions

    async def _discard_session(
        self, session_id: str, transport: StreamableHTTPServerTransport
    ) -> None:
        self.sessions.forget(session_id)
        await super()._discard_session(session_id, transport)

    @property
    def open_sessions(self) -> int:
        return len(self._server_instances)
