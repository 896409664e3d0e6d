"""JSON error exceptions (raise them) for auth, the admin API and routing: `{"error": {...}}`.
They are raised where the request id is not known; `with_request_id` adds it before sending."""

from __future__ import annotations

import json
from collections.abc import Mapping

from aiohttp import web

from gpuproxy_proxy.http.errors import error_body, kind_for_status

_JSON = "application/json"


def json_error(
    exc_class: type[web.HTTPException],
    error_type: str,
    message: str,
    headers: Mapping[str, str] | None = None,
) -> web.HTTPException:
    """An aiohttp HTTPException (raise it) whose body is the project's JSON error shape."""
    return exc_class(
        text=error_body(error_type, message, "").decode(), content_type=_JSON, headers=headers
    )


def with_request_id(exc: web.HTTPException, request_id: str) -> web.HTTPException:
    """`exc` with the request's id in its body and `X-Request-ID` header; aiohttp's own
    plain-text exceptions (e.g. a 413 from reading the body) get the JSON shape too."""
    if exc.content_type == _JSON and exc.text:
        error = json.loads(exc.text)["error"]
        kind, message = error["type"], error["message"]
    else:
        kind, message = kind_for_status(exc.status), exc.text or exc.reason
    exc.content_type = _JSON
    exc.text = error_body(kind, message, request_id).decode()
    exc.headers["X-Request-ID"] = request_id
    return exc


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
