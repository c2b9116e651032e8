"""What keeps other web sites from driving the daemon through an operator's browser.

Two holes local LLM servers have shipped, and what closes each here:

- **DNS rebinding**: a page on ``evil.example`` re-points its own name at 127.0.0.1, and its
  scripts then talk to the daemon as a same-origin site (reading answers, unloading models).
  Every such request carries ``Host: evil.example``. So a request is served only when its
  ``Host`` is one of the daemon's own names: the bind address, ``[server] allowed_hosts``, any
  IP address (a rebinding attack always shows the attacker's *name*; an address in ``Host``
  means the browser was pointed at the address), a name under ``.localhost`` (browsers resolve
  those to loopback themselves), or a name without a dot (``localhost``, this machine's
  hostname, ``x`` from a raw client): a dotless name resolves through this machine's own
  hosts file or search domain, never through an attacker's DNS zone.
- **Cross-site requests**: a page on any origin may send a form POST or a ``no-cors`` fetch to
  ``http://127.0.0.1:8600`` (it cannot read the answer, but the request has its effect).
  Browsers mark every such request with ``Origin`` (on POST, in every current engine) and
  ``Sec-Fetch-Site``. A state-changing request (anything but GET, HEAD, OPTIONS) from a browser
  must be same-origin and carry ``Content-Type: application/json`` — which a form or a
  ``no-cors`` fetch cannot send, so a browser would have to ask first (a CORS preflight), and
  trioserve never answers one with an ``Access-Control-Allow-*`` header. Clients that are not
  browsers (curl, the CLI, SDKs) send neither header and are not affected.

``/health`` is exempt: it reveals nothing and load balancers probe it by address or by name.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from trioserve.errors import TrioserveError

__all__ = ["BrowserGuard", "Forbidden"]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Sec-Fetch-Site values of a request the page itself made (or the user typed).
_OWN_SITE = frozenset({b"same-origin", b"none"})
# Host values seen, and whether they passed: a handful in practice, bounded all the same.
_CACHE_LIMIT = 256


class Forbidden(TrioserveError):
    status, code, type = 403, "forbidden", "invalid_request_error"


def host_name(host: bytes) -> str:
    """``Host`` without its port, lower case: ``[::1]:8600`` -> ``::1``."""
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1 : text.find("]")] if "]" in text else text
    name, _, _port = text.partition(":")
    return name


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class BrowserGuard:
    """The Host check and the cross-site check, for one set of the daemon's own names."""

    def __init__(self, bind_host: str, allowed_hosts: Iterable[str]) -> None:
        allowed = [name.lower() for name in allowed_hosts]
        self.any_host = "*" in allowed
        self.names = frozenset({bind_host.strip("[]").lower(), *allowed})
        self._verdicts: dict[bytes, bool] = {}

    def host_ok(self, host: bytes | None) -> bool:
        # No Host at all is an HTTP/1.0 client, never a browser.
        if host is None or self.any_host:
            return True
        verdict = self._verdicts.get(host)
        if verdict is None:
            name = host_name(host)
            verdict = (
                name in self.names
                or "." not in name
                or name.endswith(".localhost")
                or _is_address(name)
            )
            if len(self._verdicts) < _CACHE_LIMIT:
                self._verdicts[host] = verdict
        return verdict

    def check(
        self, method: str, headers: Iterable[tuple[bytes, bytes]], *, origin_always: bool = False
    ) -> Forbidden | None:
        """Why this request must not be served, or None. ``origin_always``: a foreign
        ``Origin`` is refused on reads too (``/mcp``: the MCP spec asks every request's Origin
        to be checked, and its GET stream carries the server's notifications)."""
        host = origin = fetch_site = content_type = None
        for key, value in headers:
            if key == b"host":
                host = value
            elif key == b"origin":
                origin = value
            elif key == b"sec-fetch-site":
                fetch_site = value
            elif key == b"content-type":
                content_type = value
        if not self.host_ok(host):
            shown = host_name(bytes(host or b""))[:100]
            return Forbidden(
                f"Host {shown!r} is not one of this daemon's names; add it to "
                "[server] allowed_hosts if it is yours"
            )
        if origin_always and origin is not None and not _same_origin(bytes(origin), host):
            return Forbidden("cross-origin requests are refused")
        if method in SAFE_METHODS or (origin is None and fetch_site is None):
            return None
        if fetch_site is not None and bytes(fetch_site) not in _OWN_SITE:
            return Forbidden("cross-site requests are refused")
        if origin is not None and not _same_origin(bytes(origin), host):
            return Forbidden("cross-origin requests are refused")
        if content_type is None or not bytes(content_type).lower().startswith(b"application/json"):
            return Forbidden("a browser's state-changing request must be application/json")
        return None


def _same_origin(origin: bytes, host: bytes | None) -> bool:
    """``Origin: http://H`` names the same host and port as ``Host: H``."""
    scheme, sep, rest = origin.partition(b"://")
    return bool(sep) and scheme in (b"http", b"https") and host is not None and rest == host
