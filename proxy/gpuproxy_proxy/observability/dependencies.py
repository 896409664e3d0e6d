"""What this process can reach: the database, Redis and any backend. Reported in /stats and as
`gpuproxy_dependency_up`, never in /ready: an outage degrades the requests that need the
dependency (503 with Retry-After), not the pod's membership in the Service.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

from aiohttp import web
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gpuproxy_proxy.appkeys import METRICS
from gpuproxy_proxy.database.pool import DB_POOL
from gpuproxy_proxy.limits.ratelimit import RATE_LIMITER
from gpuproxy_proxy.runtime import RUNTIME


def dependency_status(app: web.Application) -> dict[str, bool]:
    """Each configured dependency: True when usable as of its last check."""
    runtime = app[RUNTIME]
    status = {"backends": runtime.pool.any_available()}
    db = app.get(DB_POOL)
    if db is not None:
        status["database"] = db.up
    limiter = app.get(RATE_LIMITER)
    if limiter is not None and limiter.uses_redis:
        status["redis"] = limiter.redis_ready()
    return status


class DependencyCollector(Collector):
    """Read at scrape time: the numbers already exist, nothing to update per request."""

    def __init__(self, app: web.Application) -> None:
        self._app = app

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "gpuproxy_dependency_up",
            "1 when the dependency (database, redis, backends) is usable from this process.",
            labels=["dependency"],
        )
        for name, up in sorted(dependency_status(self._app).items()):
            family.add_metric([name], 1.0 if up else 0.0)
        yield family


async def dependencies_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx (after the services): exports gpuproxy_dependency_up."""
    collector = DependencyCollector(app)
    registry = app[METRICS].registry
    registry.register(collector)
    try:
        yield
    finally:
        registry.unregister(collector)
