"""The status page: ``GET /ui`` and its static files, shipped in the package (``trioserve/ui``).

The files hold no data, so they are served without a key; the page reads everything through
the admin API. Its admin calls carry a bearer credential kept in the tab's ``sessionStorage``:
an admin key the page asks for (``admin_keys`` set), or the local admin token that ``trioserve
ui`` puts in the URL's fragment (``/ui#token=…``: never sent to the server, removed from the
address bar at load). Without one the page is read-only, as ``/admin/status``'s ``"admin"``
says.

Static files live under a path named after a hash of their content: the browser may keep them
forever, and an upgrade (new content, new path) is seen at the next load of ``/ui``, which
itself is never cached.
"""

from __future__ import annotations

import hashlib
from importlib import resources

from quart import Response, redirect
from quart_trio import QuartTrio
from werkzeug.exceptions import NotFound

__all__ = ["CONTENT_SECURITY_POLICY", "add_ui_routes"]

# No inline script or style, no eval, nothing from another origin, no framing, no form posts.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_STATIC = {"app.js": "text/javascript", "style.css": "text/css", "favicon.svg": "image/svg+xml"}
_SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cross-origin-resource-policy": "same-origin",
}


def _read(name: str) -> bytes:
    return (resources.files("trioserve") / "ui" / name).read_bytes()


class _Files:
    """The page's files, read once; ``version`` names their content."""

    def __init__(self) -> None:
        self.static = {name: _read(name) for name in _STATIC}
        digest = hashlib.sha256()
        for name in sorted(self.static):
            digest.update(name.encode() + b"\0" + self.static[name])
        self.version = digest.hexdigest()[:12]
        self.page = _read("index.html").replace(
            b"{{static}}", f"/ui/static/{self.version}".encode()
        )


def add_ui_routes(app: QuartTrio) -> None:
    files = _Files()

    @app.get("/")
    async def ui_root() -> Response:
        return redirect("/ui")  # type: ignore[return-value]

    @app.get("/ui")
    async def ui_page() -> Response:
        response = Response(files.page, content_type="text/html; charset=utf-8")
        response.headers.update(_SECURITY_HEADERS)
        response.headers["cache-control"] = "no-cache"
        return response

    @app.get("/ui/static/<version>/<name>")
    async def ui_static(version: str, name: str) -> Response:
        body = files.static.get(name)
        if version != files.version or body is None:
            # An old page asking for its own version's files: reloading /ui brings the new one.
            raise NotFound("no such file in this version of the page; reload /ui")
        response = Response(body, content_type=_STATIC[name])
        response.headers.update(_SECURITY_HEADERS)
        response.headers["cache-control"] = "public, max-age=31536000, immutable"
        return response
