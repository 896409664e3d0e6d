"""The client port's routes: path (and method) -> what answers it. Only /v1/* is forwarded,
always to a configured backend; /admin/keys is the admin API; anything else is a 404."""

from __future__ import annotations

from typing import Literal

# Exact paths first, as aiohttp's router had them; GET only for /v1/models (other methods
# on it fall through to the catch-all /v1/* route, as they did).
_EXACT = {
    "/v1/chat/completions": "chat_completions",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}
_ADMIN_KEYS = "/admin/keys"
_ADMIN_KEY_PREFIX = "/admin/keys/"

Kind = Literal["proxy", "admin_create", "admin_list", "admin_revoke", "not_found"]


def route_for(method: str, path: str) -> tuple[Kind, str]:
    """(kind, argument): the proxy route name, the admin key id, or "" for a 404."""
    name = _EXACT.get(path)
    if name is not None:
        return "proxy", name
    if path.startswith("/v1/"):
        if path == "/v1/models" and method == "GET":
            return "proxy", "models"
        return "proxy", "other"
    if path == _ADMIN_KEYS:
        if method == "POST":
            return "admin_create", ""
        if method == "GET":
            return "admin_list", ""
    elif path.startswith(_ADMIN_KEY_PREFIX) and method == "DELETE":
        key_id = path[len(_ADMIN_KEY_PREFIX):]
        if key_id and "/" not in key_id:
            return "admin_revoke", key_id
    return "not_found", ""
