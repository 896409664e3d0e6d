"""JSON error responses shared by auth, rate limiting and the admin API: `{"error": {...}}`."""

from __future__ import annotations

import json
from collections.abc import Mapping

from aiohttp import web

_JSON = "application/json"


def error_body(error_type: str, message: str) -> str:
    return json.dumps({"error": {"type": error_type, "message": message}})


def json_error(
    exc_class: type[web.HTTPException],
    error_type: str,
    message: str,
    headers: Mapping[str, str] | None = None,
) -> web.HTTPException:
    """An aiohttp HTTPException (raise it) whose body is the project's JSON error shape."""
    return exc_class(
        text=error_body(error_type, message), content_type=_JSON, headers=headers
    )


def unauthorized(message: str, error: str = "invalid_token") -> web.HTTPException:
    # RFC 6750: a 401 names the scheme; `error` is omitted when no credentials were sent.
    challenge = 'Bearer realm="gpuproxy"'
    if error:
        challenge += f', error="{error}"'
    return json_error(
        web.HTTPUnauthorized, "authentication_error", message, {"WWW-Authenticate": challenge}
    )


def forbidden(message: str) -> web.HTTPException:
    return json_error(web.HTTPForbidden, "permission_error", message)


def unavailable(message: str, retry_after_seconds: int = 1) -> web.HTTPException:
    return json_error(
        web.HTTPServiceUnavailable,
        "service_unavailable",
        message,
        {"Retry-After": str(retry_after_seconds)},
    )
