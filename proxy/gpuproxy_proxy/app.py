"""The one app factory of the client port: state under AppKeys, resources in cleanup contexts."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from gpuproxy_proxy.appkeys import CONFIG, METRICS, SECRETS
from gpuproxy_proxy.auth.authenticator import auth_ctx
from gpuproxy_proxy.auth.revocations import revocations_ctx
from gpuproxy_proxy.auth.secretfiles import secrets_ctx
from gpuproxy_proxy.config import ProxyConfig, Secrets
from gpuproxy_proxy.database.partitions import partitions_ctx
from gpuproxy_proxy.database.pool import db_ctx
from gpuproxy_proxy.limits.ratelimit import ratelimit_ctx
from gpuproxy_proxy.limits.tokens import tokens_ctx
from gpuproxy_proxy.metering.meter import metering_ctx
from gpuproxy_proxy.observability.dependencies import dependencies_ctx
from gpuproxy_proxy.observability.metrics import ProxyMetrics
from gpuproxy_proxy.reload import CONFIG_PATH, reload_ctx
from gpuproxy_proxy.routes import pipeline_ctx
from gpuproxy_proxy.routing.backends import build_pool
from gpuproxy_proxy.routing.discovered import discovery_ctx
from gpuproxy_proxy.routing.health import health_ctx
from gpuproxy_proxy.routing.scraper import signals_ctx
from gpuproxy_proxy.runtime import RUNTIME, Runtime, client_timeout
from gpuproxy_proxy.upstream.forward import upstream_ctx


def build_app(
    config: ProxyConfig,
    secrets: Secrets,
    *,
    config_path: Path | None = None,
    worker_index: int = 0,
) -> web.Application:
    # No routes: the client port is served by http/frontend.py; the app holds the services.
    app = web.Application()
    metrics = ProxyMetrics()
    app[CONFIG] = config
    app[SECRETS] = secrets
    app[METRICS] = metrics
    pool = build_pool(config.backends, config.load_balancing, metrics)
    app[RUNTIME] = Runtime(config, pool, client_timeout(config), worker_index=worker_index)
    if config_path is not None:
        app[CONFIG_PATH] = config_path
    # Order is the contract: services first, then the pipeline that resolves them once.
    app.cleanup_ctx.extend([
        db_ctx, partitions_ctx, auth_ctx, revocations_ctx, ratelimit_ctx, tokens_ctx, metering_ctx,
        upstream_ctx, health_ctx, discovery_ctx, signals_ctx, pipeline_ctx, dependencies_ctx,
        reload_ctx, secrets_ctx,
    ])
    return app
