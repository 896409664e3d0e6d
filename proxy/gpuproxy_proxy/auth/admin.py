"""The admin API: create, list and revoke API keys (admin token only), mounted on an aiohttp
app: the admin API's own listener (http/adminlistener.py), never the client port. Failed
authentication is counted per client IP (adminguard.py)."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from aiohttp import web
from multidict import MultiMapping

from gpuproxy_proxy.appkeys import CONFIG, METRICS
from gpuproxy_proxy.auth.adminguard import AdminAuthGuard
from gpuproxy_proxy.auth.apikeys import DatabaseUnavailable
from gpuproxy_proxy.auth.authenticator import AUTHENTICATOR, bearer_token
from gpuproxy_proxy.http.errors import body_too_large
from gpuproxy_proxy.http.exceptions import (
    forbidden,
    json_error,
    unauthorized,
    unavailable,
    with_request_id,
)
from gpuproxy_proxy.http.request import BodyTooLarge
from gpuproxy_proxy.http.requestid import request_id_for
from gpuproxy_proxy.runtime import RUNTIME

log = logging.getLogger(__name__)

ADMIN_GUARD = web.AppKey("admin_guard", AdminAuthGuard)


class AdminRequest(Protocol):
    @property
    def app(self) -> web.Application: ...

    @property
    def headers(self) -> MultiMapping[str]: ...

    @property
    def remote(self) -> str | None: ...

    @property
    def query(self) -> MultiMapping[str]: ...

    @property
    def match_info(self) -> Mapping[str, str]: ...

    async def json(self) -> Any: ...


Handler = Callable[[AdminRequest], Awaitable[web.Response]]

_MAX_FIELD_LEN = 200
_MAX_LIST = 10_000


def _require_admin(request: AdminRequest) -> None:
    auth = request.app[AUTHENTICATOR]
    if not auth.admin_enabled:
        # Nothing to guess while no token is accepted: not counted as a failure.
        raise forbidden("the admin API is disabled: " + (
            auth.admin_refused or f"no admin token is set; set {auth.admin_token_source}"))
    guard = request.app.get(ADMIN_GUARD)
    metrics = request.app.get(METRICS)
    ip = request.remote or "unknown"
    wait = guard.retry_after(ip) if guard is not None else None
    if wait is not None:
        if metrics is not None:
            metrics.admin_auth_refused.labels("locked_out").inc()
        # Refused before the token is compared: a locked-out IP learns nothing by guessing.
        raise json_error(web.HTTPTooManyRequests, "rate_limit_exceeded",
                         f"too many failed admin authentications from {ip}; retry after "
                         f"{wait} s", {"Retry-After": str(wait)})
    reason = "malformed credentials"
    try:
        token = bearer_token(request)
        if token is None:
            reason = "no credentials"
            raise unauthorized("missing credentials: send 'Authorization: Bearer <admin token>'",
                               "")
        if not auth.is_admin_token(token):
            reason = "invalid admin token"
            raise unauthorized("invalid admin token")
    except web.HTTPUnauthorized:
        if guard is not None:
            guard.failed(ip, reason)
        if metrics is not None:
            metrics.admin_auth_refused.labels("failed").inc()
        raise
    if guard is not None:
        guard.succeeded(ip)


def _bad_request(message: str) -> web.HTTPException:
    return json_error(web.HTTPBadRequest, "invalid_request_error", message)


def _string_field(body: dict[str, Any], name: str, required: bool) -> str:
    value = body.get(name, "")
    if not isinstance(value, str) or (required and not value.strip()):
        raise _bad_request(f"field '{name}' must be a non-empty string")
    if len(value) > _MAX_FIELD_LEN:
        raise _bad_request(f"field '{name}' must be at most {_MAX_FIELD_LEN} characters")
    return value.strip()


def _db_down(exc: DatabaseUnavailable) -> web.HTTPException:
    return unavailable(f"the key database is unavailable ({exc}); retry shortly")


async def create_key(request: AdminRequest) -> web.Response:
    _require_admin(request)
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _bad_request('the body must be JSON: {"user_id": "...", "name": "..."}') from exc
    if not isinstance(body, dict):
        raise _bad_request("the body must be a JSON object with 'user_id' (and optional 'name')")
    user_id = _string_field(body, "user_id", required=True)
    name = _string_field(body, "name", required=False)
    # Optional: a key without a team counts only against its own and its user's limits.
    team = None if body.get("team") is None else _string_field(body, "team", required=False)
    team = team or None
    try:
        key, plaintext = await request.app[AUTHENTICATOR].keys.create(user_id, name, team)
    except DatabaseUnavailable as exc:
        raise _db_down(exc) from exc
    # Audit trail without the secret: the plaintext is returned exactly once, never logged.
    log.info("API key created", extra={"key_id": key.id, "user_id": key.user_id,
                                       "team": key.team,
                                       "prefix": key.prefix, "remote": request.remote})
    return web.json_response({**key.public(), "key": plaintext}, status=201)


async def list_keys(request: AdminRequest) -> web.Response:
    _require_admin(request)
    user_id = request.query.get("user_id") or None
    include_revoked = request.query.get("include_revoked", "true").lower() != "false"
    try:
        limit = int(request.query.get("limit", "1000"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= _MAX_LIST:
        raise _bad_request(f"query parameter 'limit' must be an integer from 1 to {_MAX_LIST}")
    try:
        keys = await request.app[AUTHENTICATOR].keys.list(user_id, include_revoked, limit)
    except DatabaseUnavailable as exc:
        raise _db_down(exc) from exc
    return web.json_response({"keys": [k.public() for k in keys]})


async def revoke_key(request: AdminRequest) -> web.Response:
    _require_admin(request)
    key_id = request.match_info["key_id"]
    try:
        key = await request.app[AUTHENTICATOR].keys.revoke(key_id)
    except DatabaseUnavailable as exc:
        raise _db_down(exc) from exc
    if key is None:
        raise json_error(web.HTTPNotFound, "not_found_error", f"no API key with id {key_id!r}")
    log.info("API key revoked", extra={"key_id": key.id, "user_id": key.user_id,
                                       "remote": request.remote})
    return web.json_response(key.public())


def _with_request_id(handler: Handler) -> Handler:
    """Every answer of `handler` carries the request's id, errors in their JSON body too."""
    async def wrapped(request: AdminRequest) -> web.Response:
        request_id = request_id_for(request)
        try:
            resp = await handler(request)
        except (web.HTTPRequestEntityTooLarge, BodyTooLarge):
            # aiohttp's own 413 (client_max_size is limits.max_body_bytes) names no field.
            runtime = request.app.get(RUNTIME)  # the limit in force, after any reload
            config = request.app[CONFIG] if runtime is None else runtime.config
            return body_too_large(config.limits.max_body_bytes, request_id)
        except web.HTTPException as exc:
            with_request_id(exc, request_id)
            raise
        resp.headers["X-Request-ID"] = request_id
        return resp

    return wrapped


def add_admin_routes(app: web.Application, guard: AdminAuthGuard | None = None) -> None:
    """The admin API on an aiohttp app, with its failed-authentication guard."""
    app[ADMIN_GUARD] = guard or AdminAuthGuard()
    app.router.add_post("/admin/keys", _with_request_id(create_key))
    app.router.add_get("/admin/keys", _with_request_id(list_keys))
    app.router.add_delete("/admin/keys/{key_id}", _with_request_id(revoke_key))
