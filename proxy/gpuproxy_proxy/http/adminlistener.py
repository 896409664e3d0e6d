"""The admin API's own listener (`listen.admin_api_port`): an aiohttp app with only /admin/keys,
/admin/budgets and /admin/spend, bound by every worker (SO_REUSEPORT) and sharing that worker's
services, never the client port (the NetworkPolicy lets only the operator's namespace reach it;
people use port-forward)."""

from __future__ import annotations

import socket

from aiohttp import web
from aiohttp.typedefs import Handler

from gpuproxy_proxy.appkeys import CONFIG, METRICS
from gpuproxy_proxy.auth.admin import add_admin_routes
from gpuproxy_proxy.auth.admin_budgets import add_budget_routes
from gpuproxy_proxy.auth.admin_spend import add_spend_routes
from gpuproxy_proxy.auth.authenticator import AUTHENTICATOR
from gpuproxy_proxy.database.pool import DB_POOL
from gpuproxy_proxy.http.exceptions import with_request_id
from gpuproxy_proxy.http.requestid import request_id_for
from gpuproxy_proxy.limits.tokens import TOKEN_GATE
from gpuproxy_proxy.runtime import RUNTIME

_JSON = "application/json"


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own 404 and 405 in the project's JSON error shape, with the request id."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.content_type != _JSON or "X-Request-ID" not in exc.headers:
            with_request_id(exc, request_id_for(request))
        raise


def build_admin_api_app(services: web.Application) -> web.Application:
    """The admin API over `services` (set up already: its Authenticator exists)."""
    runtime = services[RUNTIME]
    # Key requests are tiny; the client port's body limit keeps the 413's message true.
    app = web.Application(client_max_size=runtime.config.limits.max_body_bytes,
                          middlewares=[_json_errors])
    app[CONFIG] = services[CONFIG]
    app[METRICS] = services[METRICS]  # the worker's registry: /metrics on the admin port
    app[RUNTIME] = runtime
    app[AUTHENTICATOR] = services[AUTHENTICATOR]
    add_admin_routes(app)
    # Spend is read from the worker's database pool (None without a database: 409).
    app[DB_POOL] = services.get(DB_POOL)
    add_spend_routes(app)
    if (gate := services.get(TOKEN_GATE)) is not None:
        app[TOKEN_GATE] = gate
        add_budget_routes(app)
    return app


class AdminApiListener:
    """One worker's admin API server on its SO_REUSEPORT socket."""

    def __init__(self, services: web.Application) -> None:
        self.app = build_admin_api_app(services)
        self.runner = web.AppRunner(self.app, handle_signals=False, access_log=None)

    async def start(self, sock: socket.socket) -> None:
        await self.runner.setup()
        await web.SockSite(self.runner, sock).start()

    async def close(self) -> None:
        await self.runner.cleanup()
