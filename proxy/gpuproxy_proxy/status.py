"""The admin-port app: /health, /ready, /stats, /metrics for the whole pod.

Its sources are either the local app (one process) or each worker's status socket (a
supervisor with N workers); /stats and /metrics are the sums over every source.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gpuproxy_proxy.aggregate import merge_metrics, merge_stats
from gpuproxy_proxy.appkeys import CONFIG, METRICS
from gpuproxy_proxy.db import database_ready
from gpuproxy_proxy.gcwatch import GcMonitor
from gpuproxy_proxy.ratelimit import RATE_LIMITER
from gpuproxy_proxy.runtime import RUNTIME

# Set by the worker process (not by build_app: tests run apps without a GC monitor).
GC_MONITOR = web.AppKey("gc_monitor", GcMonitor)


class Source(Protocol):
    async def stats(self) -> dict[str, Any] | None: ...
    async def metrics(self) -> str | None: ...
    async def ready(self) -> dict[str, Any] | None: ...


class LocalSource:
    """The numbers of the app running in this process."""

    def __init__(self, app: web.Application) -> None:
        self.app = app

    async def stats(self) -> dict[str, Any]:
        runtime = self.app[RUNTIME]
        return {
            "pid": os.getpid(),
            "worker": runtime.worker_index,
            "connections_active": runtime.connections_active,
            "requests_in_flight": runtime.in_flight,
            "connections_rejected": runtime.connections_rejected,
            "draining": runtime.draining,
            "config_generation": runtime.generation,
            "strategy": runtime.pool.strategy,
            "backends": runtime.pool.snapshot(),
            "gc": monitor.snapshot() if (monitor := self.app.get(GC_MONITOR)) else None,
        }

    async def metrics(self) -> str:
        return generate_latest(self.app[METRICS].registry).decode()

    async def ready(self) -> dict[str, Any]:
        app = self.app
        runtime = app[RUNTIME]
        config = app[CONFIG]
        checks: dict[str, bool] = {
            "not_draining": not runtime.draining,
            "backend_available": runtime.pool.any_available(),
        }
        if config.database is not None:
            checks["database"] = await database_ready(app)
        limiter = app.get(RATE_LIMITER)
        if config.redis is not None and config.rate_limits.on_redis_failure == "closed":
            # With "local"/"open" the proxy keeps serving without Redis, so it stays ready.
            checks["redis"] = limiter is not None and limiter.redis_ready()
        return {"ready": all(checks.values()), "checks": checks}


class UnixSource:
    """A worker process, asked over its status socket."""

    def __init__(self, path: Path) -> None:
        # Needs a running loop: create it inside the supervisor's async main.
        self.path = path
        self._session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path)))

    async def close(self) -> None:
        await self._session.close()

    async def _get(self, route: str) -> tuple[int, bytes] | None:
        try:
            async with self._session.get(
                f"http://worker{route}", timeout=aiohttp.ClientTimeout(total=2.0),
            ) as resp:
                return resp.status, await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None

    async def stats(self) -> dict[str, Any] | None:
        got = await self._get("/stats")
        return json.loads(got[1]) if got is not None and got[0] == 200 else None

    async def metrics(self) -> str | None:
        got = await self._get("/metrics")
        return got[1].decode() if got is not None and got[0] == 200 else None

    async def ready(self) -> dict[str, Any] | None:
        got = await self._get("/ready")
        return json.loads(got[1]) if got is not None else None


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=json.dumps(data).encode(),
                        content_type="application/json")


def build_status_app(
    sources: Sequence[Source],
    draining: Callable[[], bool] = lambda: False,
    *,
    aggregate: bool = True,
) -> web.Application:
    """aggregate=False serves one worker's raw numbers (its status socket)."""
    expected = len(sources)

    async def health(_: web.Request) -> web.Response:
        return _json({"status": "ok", "pid": os.getpid()})

    async def ready(_: web.Request) -> web.Response:
        answers = await asyncio.gather(*(s.ready() for s in sources))
        workers = [a for a in answers if a is not None]
        if not aggregate:
            answer = workers[0]
            return _json(answer, 200 if answer["ready"] else 503)
        ok = (not draining() and len(workers) == expected
              and all(bool(a.get("ready")) for a in workers))
        body = {"ready": ok, "draining": draining(), "workers_expected": expected,
                "workers_answering": len(workers),
                "workers": [a.get("checks") for a in workers]}
        return _json(body, 200 if ok else 503)

    async def stats(_: web.Request) -> web.Response:
        answers = await asyncio.gather(*(s.stats() for s in sources))
        workers = [a for a in answers if a is not None]
        if not aggregate:
            return _json(workers[0])
        merged = merge_stats(workers, draining())
        merged["workers_expected"] = expected
        return _json(merged)

    async def metrics(_: web.Request) -> web.Response:
        answers = await asyncio.gather(*(s.metrics() for s in sources))
        texts = [t for t in answers if t is not None]
        payload = texts[0].encode() if len(texts) == 1 else merge_metrics(texts)
        resp = web.Response(body=payload)
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/stats", stats)
    app.router.add_get("/metrics", metrics)
    return app
