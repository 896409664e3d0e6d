"""JSON error responses in the OpenAI shape: {"error": {"type", "message", "request_id"}}."""

from __future__ import annotations

import json
from collections.abc import Mapping

from aiohttp import web

# Types for the statuses aiohttp answers by itself, whose exceptions carry none.
_KINDS = {400: "invalid_request_error", 404: "not_found", 405: "method_not_allowed",
          408: "request_timeout", 413: "request_too_large", 500: "internal_error",
          504: "timeout"}


def error_body(kind: str, message: str, request_id: str) -> bytes:
    return json.dumps(
        {"error": {"type": kind, "message": message, "request_id": request_id}}
    ).encode()


def kind_for_status(status: int) -> str:
    return _KINDS.get(status, "http_error")


def json_error(
    status: int, kind: str, message: str, request_id: str,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    resp = web.Response(
        status=status, body=error_body(kind, message, request_id),
        content_type="application/json", headers=headers,
    )
    resp.headers["X-Request-ID"] = request_id
    return resp


def body_too_large(limit: int, request_id: str,
                   headers: Mapping[str, str] | None = None) -> web.Response:
    """413 naming the cluster field that sets the limit; closes the connection, as the rest of
    the body is not read."""
    resp = json_error(413, "request_too_large",
                      f"request body exceeds spec.proxy.maxBodyBytes ({limit} bytes)",
                      request_id, headers)
    resp.force_close()
    return resp
