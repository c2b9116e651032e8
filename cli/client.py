"""A small async client for the daemon's HTTP API, with errors the CLI prints as one line."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any

import httpx

from .common import DEFAULT_URL

__all__ = ["ApiError", "ClientError", "DaemonClient", "EventStream", "NoDaemon", "base_url"]

# Connecting to a local daemon takes microseconds; a few seconds covers a loaded machine.
CONNECT_TIMEOUT = 3.0
# Status, logs, lists: answered without waiting on any model.
READ_TIMEOUT = 15.0


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


def base_url(url: str | None) -> str:
    return (url or DEFAULT_URL).rstrip("/")


def _error_message(response: httpx.Response) -> str:
    where = f"{response.request.method} {response.request.url}"
    try:
        error = response.json()["error"]
        message, code = error["message"], error.get("code")
    except (ValueError, KeyError, TypeError):
        text = response.text.strip().splitlines()
        detail = f": {text[0][:200]}" if text else ""
        return f"{where} answered {response.status_code}{detail} (is this a trioserve daemon?)"
    if response.status_code == 404 and code != "model_not_found":
        # Not a model we asked about: the route itself is missing.
        return f"{where}: {message} (is this a trioserve daemon?)"
    return str(message)


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
    """``async with DaemonClient(url, key) as client:`` — one connection pool per command."""

    def __init__(self, url: str | None, api_key: str | None) -> None:
        self.url = base_url(url)
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT),
            # A proxy from the environment has no business between us and a local daemon.
            trust_env=False,
        )

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
            response = await self._http.request(method, path, params=params, timeout=timeout)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise NoDaemon(self.url) from exc
        except httpx.TimeoutException as exc:
            raise ClientError(f"the daemon at {self.url} did not answer {path} in time") from exc
        except httpx.HTTPError as exc:
            raise ClientError(f"talking to the daemon at {self.url} failed: {exc}") from exc
        if response.status_code >= 400:
            raise ApiError(response.status_code, _error_message(response))
        return response

    async def get_json(self, path: str) -> Any:
        response = await self.request("GET", path)
        try:
            return response.json()
        except ValueError as exc:
            raise ClientError(
                f"{self.url}{path} did not answer JSON (is this a trioserve daemon?)"
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
        try:
            async with self._http.stream(
                "GET", "/admin/events", timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT)
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise ApiError(response.status_code, _error_message(response))
                lines = response.aiter_lines()
                async with aclosing(lines):  # type: ignore[type-var]  # an async generator
                    # The daemon sends a comment line right after it has subscribed us: from
                    # then on no event is missed.
                    await anext(lines, None)
                    yield EventStream(lines)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise NoDaemon(self.url) from exc
