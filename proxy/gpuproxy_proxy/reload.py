"""Config file reload without restart: backends, strategy, upstream and health-check settings.

Other sections (listen, auth, limits, Redis, database...) need a restart; a change there is
logged. An invalid new file is logged and ignored; the last good config stays in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from gpuproxy_proxy.appkeys import CONFIG, METRICS
from gpuproxy_proxy.backends import build_pool
from gpuproxy_proxy.config import ProxyConfig, load_config
from gpuproxy_proxy.health import HEALTH_CHECKER
from gpuproxy_proxy.runtime import RUNTIME

log = logging.getLogger("gpuproxy.reload")

CONFIG_PATH = web.AppKey("config_path", Path)

_RELOADABLE = frozenset({"backends", "load_balancing", "upstream", "health_check", "reload"})


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)  # follows the ConfigMap's ..data symlink
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def restart_only_changes(old: ProxyConfig, new: ProxyConfig) -> list[str]:
    changed = [
        name for name in ProxyConfig.model_fields
        if name not in _RELOADABLE and getattr(old, name) != getattr(new, name)
    ]
    # The connection pool is sized once, when the process starts.
    if old.upstream.max_connections_per_backend != new.upstream.max_connections_per_backend:
        changed.append("upstream.max_connections_per_backend")
    return sorted(changed)


def apply_config(app: web.Application, new: ProxyConfig) -> None:
    """Swap in a new backend pool and settings; in-flight requests keep their backend."""
    runtime = app[RUNTIME]
    ignored = restart_only_changes(runtime.config, new)
    if ignored:
        log.warning("config sections changed that apply only after a restart: %s",
                    ", ".join(ignored))
    pool = build_pool(new.backends, new.load_balancing, app[METRICS], previous=runtime.pool)
    runtime.apply(new, pool)
    checker = app.get(HEALTH_CHECKER)
    if checker is not None:
        checker.sync(pool)
    log.info("config reloaded: %d backends, strategy %s (generation %d)",
             len(new.backends), new.load_balancing.strategy, runtime.generation)


async def _watch(app: web.Application, path: Path) -> None:
    seen = _signature(path)
    while True:
        await asyncio.sleep(app[RUNTIME].config.reload.interval_seconds)
        current = _signature(path)
        if current is None or current == seen:
            continue
        seen = current
        try:
            new = load_config(path)
        except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
            log.error("ignoring invalid config file %s (keeping the running config): %s",
                      path, exc)
            continue
        if new != app[RUNTIME].config:
            apply_config(app, new)


async def reload_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: polls the config file when the app was started from one."""
    path = app.get(CONFIG_PATH)
    task = None
    if path is not None and app[CONFIG].reload.enabled:
        task = asyncio.create_task(_watch(app, path), name="config-reload")
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
