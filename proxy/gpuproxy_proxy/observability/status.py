"""The admin-port app: /health, /ready, /stats, /metrics for the whole pod.

/health and /ready come from the process lifecycle (lifecycle.py, supervisor.py), never from
dependencies; /stats and /metrics are the sums over the sources: the local app (one process)
or each worker's status socket (a supervisor with N workers).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gpuproxy_proxy.appkeys import METRICS
from gpuproxy_proxy.observability.aggregate import merge_metrics, merge_stats
from gpuproxy_proxy.observability.dependencies import dependency_status
from gpuproxy_proxy.process.gcwatch import GcMonitor
from gpuproxy_proxy.routing.admission import ADMISSION
from gpuproxy_proxy.runtime import RUNTIME

# Set by the worker process (not by build_app: tests run apps without a GC monitor).
GC_MONITOR = web.AppKey("gc_monitor", GcMonitor)


class Source(Protocol):
    async def stats(self) -> dict[str, Any] | None: ...
    async def metrics(self) -> str | None: ...


class Lifecycle(Protocol):
    """Liveness and readiness of the process (or of the supervisor and its workers)."""

    def health(self) -> tuple[bool, dict[str, Any]]: ...
    def readiness(self) -> tuple[bool, dict[str, Any]]: ...


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
            "dependencies": dependency_status(self.app),
            "gc": monitor.snapshot() if (monitor := self.app.get(GC_MONITOR)) else None,
            "admission": queue.snapshot() if (queue := self.app.get(ADMISSION)) else None,
        }

    async def metrics(self) -> str:
        return generate_latest(self.app[METRICS].registry).decode()


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


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=json.dumps(data).encode(),
                        content_type="application/json")


def build_status_app(
    sources: Sequence[Source],
    lifecycle: Lifecycle,
    *,
    aggregate: bool = True,
) -> web.Application:
    """aggregate=False serves one worker's raw numbers (its status socket)."""
    expected = len(sources)

    async def health(_: web.Request) -> web.Response:
        ok, body = lifecycle.health()
        return _json(body, 200 if ok else 503)

    async def ready(_: web.Request) -> web.Response:
        ok, body = lifecycle.readiness()
        return _json(body, 200 if ok else 503)

    async def stats(_: web.Request) -> web.Response:
        answers = await asyncio.gather(*(s.stats() for s in sources))
        workers = [a for a in answers if a is not None]
        if not aggregate:
            return _json(workers[0])
        ready_ok, ready_body = lifecycle.readiness()
        merged = merge_stats(workers, bool(ready_body.get("draining")))
        merged["workers_expected"] = expected
        merged["ready"] = ready_ok
        merged["health"] = lifecycle.health()[0]
        merged["process"] = ready_body
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
