"""A small async client for the daemon's HTTP API, with errors the CLI prints as one line.

It goes where ``target.find_target`` decided: the admin socket or a URL (TLS for ``https://``).
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any

import httpx

from .target import Credential, LocalDaemon, Target, base_url

__all__ = ["ApiError", "ClientError", "DaemonClient", "EventStream", "NoDaemon", "base_url"]

# Connecting to a local daemon takes microseconds; a few seconds covers a loaded machine.
CONNECT_TIMEOUT = 3.0
# Status, logs, lists: answered without waiting on any model.
READ_TIMEOUT = 15.0
# The host name requests carry on the admin socket (the daemon accepts a dotless name).
_SOCKET_BASE_URL = "http://localhost"


class ClientError(Exception):
    """Anything that went wrong talking to the daemon; ``str()`` is the one line to print."""


class NoDaemon(ClientError):
    def __init__(self, url: str) -> None:
        super().__init__(f"no daemon answers at {url}")
        self.url = url


class ApiError(ClientError):
    """The daemon answered with an error status; the message is its own."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _admin(path: str) -> bool:
    return path.startswith("/admin/")


def _ssl_error(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error under an httpx error (httpx, httpcore and trio each wrap it once)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


class EventStream:
    """Lifecycle events from ``/admin/events``, one dict at a time; None when the stream ends."""

    def __init__(self, lines: AsyncIterator[str]) -> None:
        self._lines = lines

    async def receive(self) -> dict[str, Any] | None:
        while True:
            try:
                line = await anext(self._lines, None)
            except httpx.HTTPError:  # the daemon went away mid-stream
                return None
            if line is None:
                return None
            if not line.startswith("data:"):
                continue  # comments (keep-alives) and blank separators
            try:
                event = json.loads(line[5:].strip())
            except ValueError:
                continue
            if isinstance(event, dict):
                return event


class DaemonClient:
    """``async with DaemonClient(target) as client:`` — one connection pool per command."""

    def __init__(self, target: Target) -> None:
        self.target = target
        # What messages name: the URL, or the socket when requests go there.
        self.url = target.where
        # Without TLS no CA store is loaded (httpx's default costs ~25 ms of CPU per client).
        verify: ssl.SSLContext | bool = target.ssl_context or False
        transport = (
            httpx.AsyncHTTPTransport(uds=str(target.socket), verify=False)
            if target.socket is not None
            else None
        )
        self._http = httpx.AsyncClient(
            base_url=_SOCKET_BASE_URL if target.socket is not None else target.url,
            transport=transport,
            verify=verify,
            timeout=httpx.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT),
            # A proxy from the environment has no business between us and a local daemon.
            trust_env=False,
        )

    def _headers(self, path: str) -> dict[str, str]:
        """The key for ``path``: a key the user gave goes everywhere; the config's admin key
        and the local admin token only to /admin, the one place they are for."""
        key = self.target.api_key
        if not key or (self.target.credential is not Credential.API_KEY and not _admin(path)):
            return {}
        return {"authorization": f"Bearer {key}"}

    async def __aenter__(self) -> DaemonClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._http.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        wait: bool = False,
    ) -> httpx.Response:
        """Send one request; ``wait=True`` for calls that last as long as a model start."""
        timeout = httpx.Timeout(None, connect=CONNECT_TIMEOUT) if wait else httpx.USE_CLIENT_DEFAULT
        try:
            response = await self._http.request(
                method, path, params=params, headers=self._headers(path), timeout=timeout
            )
        except httpx.HTTPError as exc:
            raise self._failure(exc, path) from exc
        if response.status_code >= 400:
            raise ApiError(response.status_code, self._error_message(response))
        return response

    async def get_json(self, path: str) -> Any:
        response = await self.request("GET", path)
        try:
            return response.json()
        except ValueError as exc:
            raise ClientError(
                f"{self.label(path)} did not answer JSON (is this a trioserve daemon?)"
            ) from exc

    async def post_json(
        self, path: str, *, params: dict[str, str] | None = None, wait: bool = True
    ) -> Any:
        response = await self.request("POST", path, params=params, wait=wait)
        return response.json()

    async def get_text(self, path: str, *, params: dict[str, str] | None = None) -> str:
        return (await self.request("GET", path, params=params)).text

    @asynccontextmanager
    async def events(self) -> AsyncIterator[EventStream]:
        """Subscribe to ``/admin/events``; events that happen after this returns are seen."""
        path = "/admin/events"
        try:
            async with self._http.stream(
                "GET",
                path,
                headers=self._headers(path),
                timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT),
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise ApiError(response.status_code, self._error_message(response))
                lines = response.aiter_lines()
                async with aclosing(lines):  # type: ignore[type-var]  # an async generator
                    # The daemon sends a comment line right after it has subscribed us: from
                    # then on no event is missed.
                    await anext(lines, None)
                    yield EventStream(lines)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise self._failure(exc, path) from exc

    # -- errors as one line ---------------------------------------------------------------------

    def label(self, path: str) -> str:
        """``path`` where this client sends it, for messages."""
        if self.target.socket is not None:
            return f"{path} on the admin socket {self.target.socket}"
        return f"{self.target.url}{path}"

    def _failure(self, exc: httpx.HTTPError, path: str) -> ClientError:
        """The one line for a request that got no answer."""
        tls = _ssl_error(exc)
        if tls is not None:
            return ClientError(self._tls_message(tls))
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return NoDaemon(self.url)
        if isinstance(exc, httpx.TimeoutException):
            return ClientError(f"the daemon at {self.url} did not answer {path} in time")
        hint = ""
        # A refused peer closes the connection: cleanly (RemoteProtocolError) or, with our
        # request still unread on its side, with a reset (ReadError/WriteError) — timing decides.
        hung_up = httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError
        if isinstance(exc, hung_up) and self.target.socket is None:
            if self.target.ssl_context is None:
                hint = " (if it serves HTTPS, use an https:// URL)"
            elif not self.target.client_cert:
                # Under TLS 1.3 a refused client is often just hung up on, without an alert.
                hint = " (it may want a client certificate: pass --client-cert and --client-key)"
        # Some of httpx's errors carry no text (an EOF in the middle of TLS): say what it was.
        what = str(exc) or f"the connection ended ({type(exc).__name__})"
        return ClientError(f"talking to the daemon at {self.url} failed: {what}{hint}")

    def _tls_message(self, error: ssl.SSLError) -> str:
        if isinstance(error, ssl.SSLCertVerificationError):
            why = error.verify_message or error.reason or str(error)
            return (
                f"cannot verify the certificate of {self.url} ({why}): pass --ca-cert "
                "(TRIOSERVE_CA_CERT) with the CA that signed it"
            )
        why = error.reason or str(error)
        hint = ""
        if "CERTIFICATE_REQUIRED" in why.upper():
            hint = ": it wants a client certificate: pass --client-cert and --client-key"
        return f"the TLS handshake with {self.url} failed ({why}){hint}"

    def _error_message(self, response: httpx.Response) -> str:
        request = response.request
        if self.target.socket is not None:
            where = f"{request.method} {request.url.raw_path.decode()} (admin socket {self.url})"
        else:
            where = f"{request.method} {request.url}"
        try:
            error = response.json()["error"]
            message, code = error["message"], error.get("code")
        except (ValueError, KeyError, TypeError):
            text = response.text.strip().splitlines()
            detail = f": {text[0][:200]}" if text else ""
            return f"{where} answered {response.status_code}{detail} (is this a trioserve daemon?)"
        if response.status_code == 401 and _admin(request.url.path):
            refused = self._admin_refused(request)
            if refused is not None:
                return refused
        if response.status_code == 404 and code != "model_not_found":
            # Not a model we asked about: the route itself is missing.
            return f"{where}: {message} (is this a trioserve daemon?)"
        return str(message)

    def _admin_refused(self, request: httpx.Request) -> str | None:
        """The one line for a 401 on /admin, unless it is about a key the user gave: then the
        daemon's own words say it best."""
        target, local = self.target, self.target.local
        call = f"{request.method} {request.url.path}"
        if target.socket is not None or target.credential in (
            Credential.API_KEY,
            Credential.CONFIG_KEY,
        ):
            return None
        if target.credential is Credential.TOKEN:
            return (
                f"{call}: the daemon at {self.url} refused the local admin token of "
                f"{local.token_path}: pass --api-key with an admin key"
            )
        if local.recorded_url is None and local.configured_at(target.url):
            # The config's URL, but no running daemon proven there: whatever answers may be
            # another account's listener, so the token and the config's key stayed home.
            why = local.store_error or (
                f"the state store of {local.state_dir} records no running daemon"
            )
            return (
                f"{call} needs admin, and {why}: the config's admin key and the local admin "
                "token go only to the URL the running daemon records; pass --api-key with an "
                f"admin key of the daemon at {target.url}"
            )
        if not local.live_at(target.url):
            # The config found names another daemon (or none): its token is not for this one.
            return (
                f"{call} needs admin: pass --api-key with an admin key, or --config with the "
                f"config of the daemon at {target.url} so that its admin socket or local admin "
                "token can be used"
            )
        if target.explicit_url and local.socket_usable():
            return (
                f"{call} needs admin: pass --api-key, or leave out --url (and TRIOSERVE_URL) to "
                f"use the admin socket {local.socket}"
            )
        return (
            f"{call} needs admin, and {_no_local_admin(local)}: pass --api-key with an admin key, "
            "or run as the daemon's user (or a member of its admin_group)"
        )


def _no_local_admin(local: LocalDaemon) -> str:
    """Why neither the admin socket nor the local admin token was used."""
    token = f"read {local.token_path}"
    if local.socket is None:
        return f"this account can neither {token}"
    peer = local.socket_peer()
    if peer is None or peer == local.pid:
        return f"this account can neither connect to {local.socket} nor {token}"
    return (
        f"the admin socket {local.socket} is served by pid {peer}, not by the daemon (pid "
        f"{local.pid}), so it was not used; and this account cannot {token}"
    )
