"""JSON error responses in the OpenAI shape: {"error": {"type", "message", "request_id"}}."""

from __future__ import annotations

import json
from collections.abc import Mapping

from aiohttp import web


def error_body(kind: str, message: str, request_id: str) -> bytes:
    return json.dumps(
        {"error": {"type": kind, "message": message, "request_id": request_id}}
    ).encode()


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
