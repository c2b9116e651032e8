"""The Quart-Trio app for everything that is not the per-chunk hot path: model list, admin API,
lifecycle events and metrics. Thin: each route calls the supervisor and shapes the answer.

Here: the app, who may use it and how errors look; the routes are blueprints by concern
(``admin_models``, ``admin_status``, ``admin_streams``) and the status page (``ui``).
"""

from __future__ import annotations

import json
import re

from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from trioserve.errors import InvalidApiKey, TrioserveError
from trioserve.gateway.admin_access import log_socket_write
from trioserve.gateway.admin_context import AdminContext, error_response
from trioserve.gateway.admin_models import model_routes
from trioserve.gateway.admin_status import status_routes
from trioserve.gateway.admin_streams import stream_routes
from trioserve.gateway.admin_usage import usage_routes
from trioserve.gateway.asgi import Scope, bearer_ok
from trioserve.gateway.ui import add_ui_routes

__all__ = ["AdminContext", "build_admin_app"]


def build_admin_app(ctx: AdminContext) -> QuartTrio:
    """The admin app. Its config is ``ctx.reloader.config``, read per request: a reload is in
    force for the next request."""
    app = QuartTrio(__name__)
    add_ui_routes(app)
    for routes in (model_routes(ctx), status_routes(ctx), stream_routes(ctx), usage_routes(ctx)):
        app.register_blueprint(routes)
    reloader = ctx.reloader
    access = ctx.access

    @app.before_request
    async def _auth() -> Response | None:
        # Runs of slashes as one, as the router sees them: "//admin/…" is an admin path too.
        path = re.sub("/{2,}", "/", request.path)
        config = reloader.config
        scope: Scope = request.scope  # type: ignore[assignment]
        if path.startswith("/admin/"):
            refused = access.refusal(scope, config)
            if refused is not None:
                return error_response(refused)
            log_socket_write(scope, request.method, path)
        elif path.startswith("/v1/") and not bearer_ok(scope, config.all_api_keys):
            return error_response(InvalidApiKey())
        return None

    @app.errorhandler(TrioserveError)
    async def _trioserve_error(error: TrioserveError) -> Response:
        return error_response(error)

    @app.errorhandler(HTTPException)
    async def _http_error(error: HTTPException) -> Response:
        status = error.code or 500
        code = {404: "not_found", 405: "method_not_allowed"}.get(status, "invalid_request")
        body = {
            "error": {
                "message": error.description or error.name,
                "type": "invalid_request_error",
                "code": code,
            }
        }
        return Response(json.dumps(body), status=status, content_type="application/json")

    return app
