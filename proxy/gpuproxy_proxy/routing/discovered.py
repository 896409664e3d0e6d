"""A worker's side of discovery: discovered backends join the static ones in a new pool, built
the way a config reload builds one (unchanged backends keep their state, in-flight requests
keep the backend they hold), and swapped in with one assignment."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from aiohttp import web

from gpuproxy_proxy.appkeys import METRICS
from gpuproxy_proxy.config import BackendConfig, ProxyConfig
from gpuproxy_proxy.routing.backends import build_pool
from gpuproxy_proxy.routing.discovery import DiscoveryWatcher, read_backends
from gpuproxy_proxy.routing.health import HEALTH_CHECKER
from gpuproxy_proxy.runtime import RUNTIME

log = logging.getLogger("gpuproxy.discovery")

# Set by the worker a supervisor started: read discovered backends from this file.
DISCOVERY_FILE = web.AppKey("discovery_file", Path)
_WATCH_SECONDS = 0.1


def all_backends(config: ProxyConfig,
                 discovered: Sequence[BackendConfig]) -> list[BackendConfig]:
    """Static backends first; a discovered one never shadows a static one of the same name."""
    static = {b.name for b in config.backends}
    return [*config.backends, *(b for b in discovered if b.name not in static)]


def apply_discovered(app: web.Application, discovered: Sequence[BackendConfig]) -> None:
    runtime = app[RUNTIME]
    if list(discovered) == runtime.discovered:
        return
    runtime.discovered = list(discovered)
    pool = build_pool(all_backends(runtime.config, discovered), runtime.config.load_balancing,
                      app[METRICS], previous=runtime.pool)
    runtime.pool = pool
    if (checker := app.get(HEALTH_CHECKER)) is not None:
        checker.sync(pool)
    log.info("discovered backends: %s", ", ".join(b.name for b in discovered) or "none")


async def _watch_file(app: web.Application, path: Path) -> None:
    seen: int | None = None
    while True:
        try:
            mtime: int | None = os.stat(path).st_mtime_ns
        except OSError:
            mtime = None
        if mtime is not None and mtime != seen:
            try:
                backends = read_backends(path)
                seen = mtime
                apply_discovered(app, backends)
            except (OSError, ValueError, TypeError) as exc:
                log.warning("cannot read the discovered backends: %s", exc)
        await asyncio.sleep(_WATCH_SECONDS)


async def discovery_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: a supervisor's worker follows the file; a single process watches the API."""
    config = app[RUNTIME].config
    path = app.get(DISCOVERY_FILE)
    task = None
    if path is not None and config.discovery.sources:
        task = asyncio.create_task(_watch_file(app, path), name="discovery-file")
    elif config.discovery.sources:
        watcher = DiscoveryWatcher(config.discovery, lambda b: apply_discovered(app, b))
        task = asyncio.create_task(watcher.run(), name="discovery-watch")
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
