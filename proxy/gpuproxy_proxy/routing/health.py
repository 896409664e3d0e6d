"""Active health checks: one task per backend polls its health path on the configured interval."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from gpuproxy_proxy.routing.backends import BackendPool, BackendState
from gpuproxy_proxy.runtime import RUNTIME, Runtime

log = logging.getLogger("gpuproxy.health")


class HealthChecker:
    def __init__(self, runtime: Runtime, session: aiohttp.ClientSession) -> None:
        self._runtime = runtime
        self._session = session
        self._tasks: dict[BackendState, asyncio.Task[None]] = {}

    def sync(self, pool: BackendPool) -> None:
        """Start checks for new backends and stop them for removed ones (after a reload)."""
        wanted = set(pool.backends)
        for state in list(self._tasks):
            if state not in wanted:
                self._tasks.pop(state).cancel()
        for state in pool.backends:
            if state not in self._tasks:
                self._tasks[state] = asyncio.create_task(
                    self._loop(state), name=f"health-{state.name}"
                )

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def probe(self, state: BackendState) -> tuple[bool, str | None]:
        health = self._runtime.config.health_check
        started = time.monotonic()
        try:
            async with self._session.get(
                state.health_url, timeout=aiohttp.ClientTimeout(total=health.timeout_seconds),
                allow_redirects=False,
            ) as resp:
                await resp.read()
                if 200 <= resp.status < 300:
                    return True, None
                return False, f"HTTP {resp.status}"
        except TimeoutError:
            # A saturated event loop delays the check itself; while real traffic to this
            # backend keeps succeeding, a timeout says more about us than about the backend.
            if state.last_success >= started:
                return True, None
            return False, f"timed out after {health.timeout_seconds:g}s"
        except aiohttp.ClientError as exc:
            return False, f"{type(exc).__name__}: {exc}"

    async def _loop(self, state: BackendState) -> None:
        while True:
            ok, error = await self.probe(state)
            health = self._runtime.config.health_check
            was = state.active_healthy
            state.record_check(ok, health, error)
            if was != state.active_healthy:
                log.warning("backend %s is now %s", state.name,
                            "healthy" if state.active_healthy else f"unhealthy ({error})",
                            extra={"backend": state.name})
            await asyncio.sleep(health.interval_seconds)


HEALTH_CHECKER = web.AppKey("health_checker", HealthChecker)


async def health_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: stops every check task on cleanup.

    Checks use their own small session: if traffic used every pooled connection to a backend,
    a check queued behind it would time out and eject a backend that is merely busy.
    """
    runtime = app[RUNTIME]
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, limit_per_host=2),
        cookie_jar=aiohttp.DummyCookieJar(), trust_env=False,
    )
    checker = HealthChecker(runtime, session)
    app[HEALTH_CHECKER] = checker
    checker.sync(runtime.pool)
    try:
        yield
    finally:
        await checker.stop()
        await session.close()
