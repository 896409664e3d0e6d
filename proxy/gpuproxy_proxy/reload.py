"""Config file reload without restart: config.RELOADABLE_SECTIONS apply to the running process;
a change elsewhere (or in RESTART_ONLY_FIELDS) is logged and keeps its running value until a
restart. An invalid new file is logged and ignored; the last good config stays in force."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from gpuproxy_proxy.appkeys import CONFIG, METRICS
from gpuproxy_proxy.auth.authenticator import AUTHENTICATOR
from gpuproxy_proxy.config import (
    RELOADABLE_SECTIONS,
    RESTART_ONLY_FIELDS,
    ProxyConfig,
    config_problems,
    load_config,
    restart_key,
)
from gpuproxy_proxy.limits.ratelimit import RATE_LIMITER
from gpuproxy_proxy.limits.tokens import TOKEN_GATE
from gpuproxy_proxy.metering.meter import USAGE_METER
from gpuproxy_proxy.routes import PIPELINE
from gpuproxy_proxy.routing.backends import build_pool
from gpuproxy_proxy.routing.discovered import all_backends
from gpuproxy_proxy.routing.health import HEALTH_CHECKER
from gpuproxy_proxy.runtime import RUNTIME

log = logging.getLogger("gpuproxy.reload")

CONFIG_PATH = web.AppKey("config_path", Path)


def file_signature(path: Path) -> tuple[int, int, int] | None:
    """What changes when the file is replaced; None when it cannot be read now."""
    try:
        st = os.stat(path)  # follows the ConfigMap's (or Secret's) ..data symlink
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def restart_only_changes(old: ProxyConfig, new: ProxyConfig) -> list[str]:
    before, after = restart_key(old), restart_key(new)
    return sorted(name for name in before if before[name] != after.get(name))


def effective_config(running: ProxyConfig, new: ProxyConfig) -> ProxyConfig:
    """`new`'s reloadable parts on top of `running`: what this process can actually apply."""
    update = {name: getattr(new, name) for name in RELOADABLE_SECTIONS}
    for section, field in RESTART_ONLY_FIELDS:
        update[section] = update[section].model_copy(
            update={field: getattr(getattr(running, section), field)})
    return running.model_copy(update=update)


def apply_config(app: web.Application, new: ProxyConfig,
                 previous_file: ProxyConfig | None = None) -> None:
    """Swap in a new backend pool and settings; in-flight requests keep their backend.

    Restart-only changes are reported against the file's previous version when given (the
    running config may differ from the file by command-line overrides such as --workers)."""
    runtime = app[RUNTIME]
    ignored = restart_only_changes(previous_file or runtime.config, new)
    if ignored:
        log.warning("config changed where only a restart applies it (keeping the running "
                    "values): %s", ", ".join(ignored))
    config = effective_config(runtime.config, new)
    if config == runtime.config:
        return
    pool = build_pool(all_backends(config, runtime.discovered), config.load_balancing,
                      app[METRICS], previous=runtime.pool)
    runtime.apply(config, pool)  # also the server's limits and the logging (Worker)
    checker = app.get(HEALTH_CHECKER)
    if checker is not None:
        checker.sync(pool)
    if (auth := app.get(AUTHENTICATOR)) is not None:
        auth.reconfigure(config.auth)
    if (limiter := app.get(RATE_LIMITER)) is not None:
        limiter.reconfigure(config.rate_limits)
    if (gate := app.get(TOKEN_GATE)) is not None:
        gate.reconfigure(config)
    if (meter := app.get(USAGE_METER)) is not None:
        meter.reconfigure(config.metering)
    if (pipeline := app.get(PIPELINE)) is not None:
        pipeline.reconfigure(config)
    log.info("config reloaded: %d backends, strategy %s (generation %d)",
             len(config.backends), config.load_balancing.strategy, runtime.generation)


async def _watch(app: web.Application, path: Path) -> None:
    seen = file_signature(path)
    try:
        previous = load_config(path)
    except (OSError, ValueError):
        previous = app[CONFIG]
    while True:
        await asyncio.sleep(app[RUNTIME].config.reload.interval_seconds)
        current = file_signature(path)
        if current is None or current == seen:
            continue
        seen = current
        try:
            new = load_config(path)
        except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
            log.error("ignoring invalid config file %s (keeping the running config): %s",
                      path, "; ".join(config_problems(exc)))
            continue
        apply_config(app, new, previous)
        previous = new


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
