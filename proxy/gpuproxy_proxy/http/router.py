"""The client port's routes: path (and method) -> what answers it. Only /v1/* is forwarded,
always to a configured backend; anything else is a 404 (the admin API has its own listener,
listen.admin_api_port, so /admin/* is unknown here too)."""

from __future__ import annotations

from typing import Literal

# Exact paths first, as aiohttp's router had them; GET only for /v1/models (other methods
# on it fall through to the catch-all /v1/* route, as they did).
_EXACT = {
    "/v1/chat/completions": "chat_completions",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}

Kind = Literal["proxy", "not_found"]


def route_for(method: str, path: str) -> tuple[Kind, str]:
    """(kind, argument): the proxy route name, or "" for a 404."""
    name = _EXACT.get(path)
    if name is not None:
        return "proxy", name
    if path.startswith("/v1/"):
        if path == "/v1/models" and method == "GET":
            return "proxy", "models"
        return "proxy", "other"
    return "not_found", ""
