"""Which requests the relay serves, and ``/upstream/{model}/{path}``: who may pass a request
through to a model server, as whom it is counted, and where it goes there.

``/upstream`` reaches everything a model server has (llama-server's ``/slots`` can erase a
slot, ``/props`` can change its settings), so by default only an admin may use it, decided as
for ``/admin`` writes (``AdminAccess``); ``upstream_passthrough = "users"`` opens it to /v1's
keys, ``"off"`` closes it.
"""

from __future__ import annotations

from trioserve.config import Config
from trioserve.errors import InvalidApiKey, InvalidRequest
from trioserve.gateway.admin_access import AdminAccess
from trioserve.gateway.apis import API_PATHS, PASSTHROUGH, PASSTHROUGH_PREFIX, Api
from trioserve.gateway.asgi import Scope, presented_key
from trioserve.sharing.identity import ADMIN_USER, ANONYMOUS, User, identify

__all__ = ["passthrough_target", "passthrough_user", "relayed_api"]


def relayed_api(method: str, path: str) -> Api | None:
    """The API of a request the relay serves, or None for one it does not."""
    if method == "POST":
        api = API_PATHS.get(path)
        if api is not None:
            return api
    return PASSTHROUGH if path.startswith(PASSTHROUGH_PREFIX) else None


def passthrough_user(config: Config, access: AdminAccess, scope: Scope, client: str | None) -> User:
    """The user an ``/upstream`` request is made as; raises when it may not be made."""
    allowed = config.server.upstream_passthrough
    if allowed == "off":
        raise InvalidRequest('/upstream is off (server.upstream_passthrough = "off")', status=404)
    if allowed == "users":
        return identify(config, presented_key(scope), None, client)
    if access.presents_admin_credential(scope, config):
        return ADMIN_USER
    if not access.is_admin(scope, config):
        raise InvalidApiKey(
            '/upstream needs admin (server.upstream_passthrough = "admin"): an admin key, or '
            "the local admin token when admin_keys is empty"
        )
    # Anyone is admin (admin_over_tcp = "open"): counted as a /v1 request would be, or by its
    # address when it has no /v1 key.
    try:
        return identify(config, presented_key(scope), None, client)
    except InvalidApiKey:
        return User(key=f"addr:{client}") if client else ANONYMOUS


def passthrough_target(scope: Scope) -> tuple[str, str]:
    """``/upstream/{model}/{path}?{query}`` → (model, ``/{path}?{query}``)."""
    name, _, path = scope["path"][len(PASSTHROUGH_PREFIX) :].partition("/")
    if not name:
        raise InvalidRequest("/upstream/{model}/{path}: the model's name is missing")
    query: bytes = scope.get("query_string") or b""
    return name, "/" + path + ("?" + query.decode("latin-1") if query else "")
