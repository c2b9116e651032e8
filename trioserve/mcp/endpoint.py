"""``/mcp``: the ASGI entry of the MCP endpoint, in front of the SDK's Streamable HTTP session
manager (no Starlette app: its routing redirects ``/mcp/`` and its manager would only start on
a lifespan the gateway never delivers).

Per request: the key decides the caller exactly as on ``/v1`` (``identify``; 401 in our OpenAI
shape), admin exactly as for ``/admin`` writes (``AdminAccess``; an admin session's model calls
are the reserved user ``admin``); the SDK binds a session to the key that opened it (another
key: 404); beyond ``max_sessions`` the SDK's 503 gets a ``Retry-After``; a client gone in the
middle of a call cancels it (``gone.py``). Host and Origin were decided before, by the gateway's
``BrowserGuard``, so the SDK's own check is off.

The manager runs from ``run`` in the daemon's nursery; ``stop`` (at the end of the drain) ends
every session and call. A reload assigns the session limits live (``run`` can be entered only
once per manager) and tells open sessions when the model list changed.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import trio
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings

from trioserve import __version__
from trioserve.config import Config
from trioserve.errors import InvalidApiKey, InvalidRequest, TrioserveError
from trioserve.gateway.admin_access import AdminAccess
from trioserve.gateway.asgi import (
    Message,
    Receive,
    Scope,
    Send,
    presented_key,
    send_error,
    send_json,
)
from trioserve.gateway.relay import Relay
from trioserve.mcp.context import CALLER, Caller
from trioserve.mcp.gone import ClientGone
from trioserve.mcp.resources import STATUS_URI, register_resources
from trioserve.mcp.sessions import Sessions, TrioserveSessionManager
from trioserve.mcp.tools import ToolDeps, model_names, register_tools
from trioserve.mcp.views import Views
from trioserve.sharing.identity import ADMIN_USER, identify
from trioserve.supervision.events import Lagged
from trioserve.supervision.supervisor import Supervisor

__all__ = ["McpEndpoint"]

log = logging.getLogger(__name__)

# Retry-After of the 503 beyond max_sessions: sessions end by DELETE or the idle timeout.
RETRY_AFTER_S = 5
_KEY_HEADERS = (b"authorization", b"x-api-key")
_INSTRUCTIONS = (
    "trioserve runs local language models. `chat` asks one (started on demand), `embed` "
    "gives embeddings, `models` shows their state. trioserve://status is subscribable."
)


class McpEndpoint:
    """The ASGI app of ``/mcp`` and the session manager's life."""

    def __init__(
        self, config: Config, relay: Relay, supervisor: Supervisor, access: AdminAccess
    ) -> None:
        self.supervisor = supervisor
        self.access = access
        self.sessions = Sessions()
        self._config = config
        self._models = model_names(config)
        self._tools_changed = trio.Event()
        self._cancel = trio.CancelScope()
        # The requests being handled now (see ``stop``).
        self._handling: set[trio.CancelScope] = set()
        self.server = _quiet_server(self.sessions)
        register_tools(self.server, ToolDeps(relay, supervisor, self.sessions, self._live))
        register_resources(self.server, supervisor, self.sessions, self.counts, self._live)
        # The SDK's OpenTelemetry middleware (first in the chain) makes a span per message:
        # a no-op without an exporter, which the daemon never installs. Dropping it from the
        # list is the SDK's documented opt-out (``Server.middleware``).
        self.server.middleware[:] = [
            m for m in self.server.middleware if type(m).__name__ != "OpenTelemetryMiddleware"
        ]
        self.server.middleware.append(Views(self.sessions, self._live))
        self.manager = TrioserveSessionManager(
            self.sessions,
            # The low-level server MCPServer wraps; no public accessor in mcp 2.3.
            app=self.server._lowlevel_server,
            security_settings=TransportSecuritySettings(enable_dns_rebinding_protection=False),
            max_sessions=config.mcp.max_sessions,
            session_idle_timeout=config.mcp.session_idle_timeout,
            max_request_body_size=config.server.max_body_bytes,
            # SSE answers: JSON ones would drop progress, and nobody would watch for a client
            # gone (``gone.py``).
            json_response=False,
        )

    def _live(self) -> Config:
        return self._config

    @property
    def config(self) -> Config:
        return self._config

    @config.setter
    def config(self, config: Config) -> None:
        """At a reload: limits apply to sessions admitted from now on; a changed model list
        is announced to open sessions (``tools/list_changed``)."""
        self._config = config
        self.manager.max_sessions = config.mcp.max_sessions
        self.manager.session_idle_timeout = config.mcp.session_idle_timeout
        models = model_names(config)
        if models != self._models:
            self._models = models
            self._tools_changed.set()

    def counts(self) -> dict[str, int]:
        return {
            "sessions": self.manager.open_sessions,
            "calls_in_flight": self.sessions.calls_in_flight,
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The session manager's task group lives in this task, until ``stop``."""
        with self._cancel:
            async with self.manager.run(), trio.open_nursery() as nursery:
                nursery.start_soon(self._announce_tools)
                nursery.start_soon(self._watch_models)
                task_status.started()
                await trio.sleep_forever()

    def stop(self) -> None:
        """End every session and call (their GET streams would hold the server's stop), and
        every request still being handled: a 2026-07-28 request runs in its HTTP request's own
        task, not the manager's, and a ``subscriptions/listen`` one never ends by itself."""
        self._cancel.cancel()
        for handling in list(self._handling):
            handling.cancel()

    async def _announce_tools(self) -> None:
        while True:
            await self._tools_changed.wait()
            self._tools_changed = trio.Event()
            await self.sessions.tools_changed()

    async def _watch_models(self) -> None:
        async with self.supervisor.events.watch() as watch:
            async for event in watch:
                await self.sessions.resource_updated(STATUS_URI)
                if not isinstance(event, Lagged):
                    await self.sessions.log("info", {"event": "model", **event.as_dict()})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        config = self._config
        if not config.mcp.enabled:
            await send_error(
                send, InvalidRequest("/mcp is off ([mcp] enabled = false)", status=404)
            )
            return
        if self._cancel.cancel_called:
            # Stopped at the end of the drain: the manager takes nothing more (a client's GET
            # reconnecting on a keep-alive connection would meet a manager with no task group).
            stopping = TrioserveError(
                "trioserve is stopping: /mcp takes no new requests",
                retry_after=RETRY_AFTER_S,
                status=503,
            )
            await send_json(
                send,
                stopping.status,
                stopping.body_bytes(),
                [*stopping.headers()[1:], (b"connection", b"close")],
            )
            return
        key = presented_key(scope)
        admin = self.access.is_admin(scope, config)
        client = scope.get("client")
        if admin and self.access.presents_admin_credential(scope, config):
            # The admin's own calls. Anyone made admin by admin_over_tcp = "open" stays the
            # user its key says, with that user's budgets and share.
            user = ADMIN_USER
        else:
            try:
                user = identify(config, key, None, client[0] if client else None)
            except InvalidApiKey as exc:
                await send_error(send, exc)
                return
        if key:
            # The SDK binds a session to this principal: another key (or none) gets 404.
            key_id = hashlib.sha256(key).hexdigest()[:32]
            scope["user"] = AuthenticatedUser(AccessToken(token="-", client_id=key_id, scopes=[]))
        headers = tuple((k, bytes(v)) for k, v in scope["headers"] if k in _KEY_HEADERS)
        token = CALLER.set(Caller(user, admin, headers, tuple(client) if client else None))
        gone = ClientGone()
        gone.install(scope)
        watched_receive, watched_send = gone.wrap(receive, send)

        async def limited_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 503:
                retry = (b"retry-after", str(RETRY_AFTER_S).encode())
                message = {**message, "headers": [*message.get("headers", []), retry]}
            if message["type"] == "http.response.body" and not message.get("more_body"):
                # Hypercorn recycles the connection inside the last send, and queues
                # ``http.disconnect`` there; that wakes sse-starlette's disconnect listener,
                # whose task group then cancels this very send. Cancelled half-way, the
                # recycle leaves the connection open with no keep-alive timer (or, during a
                # stop, not closed): a request the client sends on it later is never read, and
                # at a stop it holds Hypercorn for the whole grace. The relay keeps its last
                # sends out of its watcher's scope for the same reason (``Relay._send_last``).
                # Bounded all the same: the write is LeanTCPServer's (SEND_LIMIT), the recycle
                # awaits nothing that waits.
                with trio.CancelScope(shield=True):
                    await watched_send(message)
                return
            await watched_send(message)

        try:
            with trio.CancelScope() as handling:
                self._handling.add(handling)
                try:
                    await self.manager.handle_request(scope, watched_receive, limited_send)
                finally:
                    self._handling.discard(handling)
        finally:
            CALLER.reset(token)


def _quiet_server(sessions: Sessions) -> MCPServer[Any]:
    """The MCPServer, made without its ``logging.basicConfig`` on the root logger (it calls
    that when the root has no handler: the daemon's logging is its owner's to set)."""
    root = logging.getLogger()
    placeholder = logging.NullHandler() if not root.handlers else None
    if placeholder is not None:
        root.addHandler(placeholder)
    try:
        return MCPServer(
            "trioserve",
            version=__version__,
            instructions=_INSTRUCTIONS,
            log_level="WARNING",
            subscriptions=sessions.bus,
        )
    finally:
        if placeholder is not None:
            root.removeHandler(placeholder)
