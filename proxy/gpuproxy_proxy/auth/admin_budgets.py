"""The admin API's budgets: `PUT/GET/DELETE /admin/budgets/{scope}/{id}` (scope: api_key, user
or team) set, read (limit, spent, reserved, remaining, resets_at) and remove one budget."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gpuproxy_proxy.auth.admin import AdminRequest, _bad_request, _require_admin, _with_request_id
from gpuproxy_proxy.http.exceptions import json_error, unavailable
from gpuproxy_proxy.limits.budgets import (
    PERIODS,
    UNITS,
    Budget,
    BudgetDatabaseUnavailable,
    to_stored,
)
from gpuproxy_proxy.limits.reservation import SCOPES
from gpuproxy_proxy.limits.tokens import TOKEN_GATE, TokenGate

_MAX_ID = 200
_FAILURES = (RedisError, OSError, TimeoutError)


def _target(request: AdminRequest) -> tuple[TokenGate, Redis, str, str]:
    _require_admin(request)
    gate = request.app[TOKEN_GATE]
    client = gate.redis_client
    if not gate.budgets_on or client is None:
        raise json_error(web.HTTPConflict, "budgets_disabled",
                         "budgets are off: set budgets.enabled and a redis section in the "
                         "proxy config")
    scope, ident = request.match_info["scope"], request.match_info["ident"]
    if scope not in SCOPES:
        raise _bad_request(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    if not ident or len(ident) > _MAX_ID:
        raise _bad_request(f"the id must be 1 to {_MAX_ID} characters")
    return gate, client, scope, ident


@contextlib.contextmanager
def _stores_answering() -> Iterator[None]:
    """The budget stores' failures as the 503 the caller can retry."""
    try:
        yield
    except BudgetDatabaseUnavailable as exc:
        raise unavailable(f"the budget database is unavailable ({exc}); retry shortly") from exc
    except _FAILURES as exc:
        raise unavailable(f"Redis is unavailable ({type(exc).__name__}); retry shortly") from exc


def _parse(body: Any, scope: str, ident: str) -> Budget:
    if not isinstance(body, dict):
        raise _bad_request('the body must be a JSON object: {"limit": 100000, "unit": '
                           '"tokens", "period": "month"}')
    limit, unit, period = body.get("limit"), body.get("unit", "tokens"), body.get("period",
                                                                                "month")
    if unit not in UNITS:
        raise _bad_request(f"field 'unit' must be one of {', '.join(UNITS)}")
    if period not in PERIODS:
        raise _bad_request(f"field 'period' must be one of {', '.join(PERIODS)}")
    if isinstance(limit, bool) or not isinstance(limit, int | float) or not math.isfinite(
            limit) or limit < 0 or (unit == "tokens" and not float(limit).is_integer()):
        raise _bad_request("field 'limit' must be a number >= 0 (whole tokens, or USD)")
    stored = to_stored(limit, unit)
    if stored > 2**62:
        raise _bad_request("field 'limit' is too large")
    return Budget(scope, ident, stored, unit, period)


async def put_budget(request: AdminRequest) -> web.Response:
    gate, client, scope, ident = _target(request)
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _bad_request("the body must be JSON") from exc
    budget = _parse(body, scope, ident)
    with _stores_answering():
        await gate.budgets.put(client, budget)
        status = await gate.budgets.status(client, scope, ident)
    return web.json_response(status)


async def get_budget(request: AdminRequest) -> web.Response:
    gate, client, scope, ident = _target(request)
    with _stores_answering():
        status = await gate.budgets.status(client, scope, ident)
    if status is None:
        raise json_error(web.HTTPNotFound, "not_found_error", f"no budget for {scope} {ident!r}")
    return web.json_response(status)


async def delete_budget(request: AdminRequest) -> web.Response:
    gate, client, scope, ident = _target(request)
    with _stores_answering():
        found = await gate.budgets.delete(client, scope, ident)
    if not found:
        raise json_error(web.HTTPNotFound, "not_found_error", f"no budget for {scope} {ident!r}")
    return web.json_response({"scope": scope, "id": ident, "deleted": True})


def add_budget_routes(app: web.Application) -> None:
    path = "/admin/budgets/{scope}/{ident}"
    app.router.add_put(path, _with_request_id(put_budget))
    app.router.add_get(path, _with_request_id(get_budget))
    app.router.add_delete(path, _with_request_id(delete_budget))
