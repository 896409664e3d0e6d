"""One scraper per pod: every backend's /metrics (each interval) and /v1/models (less often),
concurrently, with a short timeout. The supervisor publishes the result as a JSON file its
workers re-read when it changes; a single-process proxy hands it to its pool directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import aiohttp
from aiohttp import web

from gpuproxy_proxy.config import BackendConfig, ProxyConfig
from gpuproxy_proxy.routing.backends import BackendPool
from gpuproxy_proxy.routing.signals import (
    BackendSignals,
    MetricsFormatError,
    parse_metrics,
    parse_models,
    read_snapshot,
    write_snapshot,
)
from gpuproxy_proxy.runtime import RUNTIME

log = logging.getLogger("gpuproxy.signals")

# Set by the worker a supervisor started: read signals from this file, scrape nothing.
SIGNALS_FILE = web.AppKey("signals_file", Path)
SNAPSHOT_NAME = "signals.json"
# How often a worker stats the snapshot file (one syscall; the file changes once a second).
_WATCH_SECONDS = 0.1
_MAX_BODY = 4 * 1024 * 1024


def _url(backend: BackendConfig, path: str) -> str:
    return str(backend.url).rstrip("/") + "/" + path.lstrip("/")


class SignalScraper:
    """Scrapes the backends of `config()` (re-read each round, so reloads apply) and calls
    `publish` with every backend's latest signals; a backend that left is forgotten."""

    def __init__(self, config: Callable[[], ProxyConfig],
                 publish: Callable[[dict[str, BackendSignals]], None]) -> None:
        self.config = config
        self.publish = publish
        self.signals: dict[str, BackendSignals] = {}

    async def run(self) -> None:
        session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), trust_env=False,
                                        connector=aiohttp.TCPConnector(limit=0))
        try:
            while True:
                config = self.config()
                signals = config.load_balancing.signals
                if config.load_balancing.signals_on and config.backends:
                    started = time.monotonic()
                    try:
                        await self.scrape_once(session, config)
                    except Exception:  # a bug here must not end scraping for the pod's life
                        log.exception("scraping the backends' signals failed")
                    spent = time.monotonic() - started
                    await asyncio.sleep(max(0.05, signals.interval_seconds - spent))
                else:
                    if self.signals:
                        self.signals = {}
                        self.publish({})
                    await asyncio.sleep(signals.interval_seconds)
        finally:
            await session.close()

    async def scrape_once(self, session: aiohttp.ClientSession, config: ProxyConfig) -> None:
        backends = config.backends
        results = await asyncio.gather(*(self._scrape(session, config, b) for b in backends))
        self.signals = {b.name: sig for b, sig in zip(backends, results, strict=True)}
        self.publish(self.signals)

    async def _scrape(self, session: aiohttp.ClientSession, config: ProxyConfig,
                      backend: BackendConfig) -> BackendSignals:
        cfg = config.load_balancing.signals
        previous = self.signals.get(backend.name)
        timeout = aiohttp.ClientTimeout(total=cfg.timeout_seconds)
        now = time.monotonic()
        sig = previous or BackendSignals()
        models_due = sig.models_at == 0.0 or now - sig.models_at >= cfg.models_interval_seconds
        metrics_task = self._get(session, _url(backend, cfg.metrics_path), timeout)
        if models_due:
            metrics_body, models_body = await asyncio.gather(
                metrics_task, self._get(session, _url(backend, "/v1/models"), timeout))
        else:
            metrics_body, models_body = await metrics_task, None
        scraped_at = time.monotonic()
        if isinstance(metrics_body, bytes):
            try:
                sig = parse_metrics(metrics_body.decode("utf-8", "replace"), scraped_at, sig)
            except MetricsFormatError as exc:
                sig = _failed(sig, str(exc))
        else:
            # Keep the last signal: it ages out by itself (max_age_seconds).
            sig = _failed(sig, metrics_body)
        if isinstance(models_body, bytes):
            # A backend without a usable /v1/models: every model may go there.
            with contextlib.suppress(ValueError, KeyError):
                sig = _with_models(sig, parse_models(models_body), scraped_at)
        return sig

    @staticmethod
    async def _get(session: aiohttp.ClientSession, url: str,
                   limit: aiohttp.ClientTimeout) -> bytes | str:
        """The body of a 200 answer, else why not (never raises for the backend's faults)."""
        try:
            async with session.get(url, timeout=limit, allow_redirects=False) as resp:
                if resp.status != 200:
                    return f"HTTP {resp.status}"
                return await resp.content.read(_MAX_BODY)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return type(exc).__name__


def _failed(sig: BackendSignals, error: str) -> BackendSignals:
    return replace(sig, error=error)


def _with_models(sig: BackendSignals, models: tuple[str, ...], at: float) -> BackendSignals:
    return replace(sig, models=models, models_at=at)


def apply_to_pool(pool: BackendPool, signals: dict[str, BackendSignals]) -> None:
    for backend in pool.backends:
        backend.apply_signals(signals.get(backend.name))


async def watch_snapshot(path: Path, pool: Callable[[], BackendPool]) -> None:
    """A worker's side: re-read the supervisor's snapshot when its mtime changes, and hand
    the current one to a pool a reload swapped in."""
    seen: int | None = None
    applied_to: BackendPool | None = None
    signals: dict[str, BackendSignals] = {}
    while True:
        try:
            mtime = os.stat(path).st_mtime_ns  # one syscall on a tmpfs-like dir: not blocking
        except OSError:
            mtime = None
        if mtime is not None and mtime != seen:
            try:
                signals = read_snapshot(path)
                seen = mtime
                applied_to = None
            except (OSError, ValueError, TypeError) as exc:
                log.warning("cannot read the signals snapshot: %s", exc)
        current = pool()
        if current is not applied_to:
            apply_to_pool(current, signals)
            applied_to = current
        await asyncio.sleep(_WATCH_SECONDS)


async def signals_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: a supervisor's worker watches the snapshot file; a single process scrapes
    (idle, one sleep per interval, while no strategy needs signals)."""
    runtime = app[RUNTIME]
    path = app.get(SIGNALS_FILE)
    if path is not None:
        task = asyncio.create_task(watch_snapshot(path, lambda: runtime.pool),
                                   name="signals-watch")
    else:
        # Discovered backends are scraped too: the pool's backends, not only the file's.
        scraper = SignalScraper(lambda: runtime.config.model_copy(update={"backends": [
                                    b.config for b in runtime.pool.backends]}),
                                lambda signals: apply_to_pool(runtime.pool, signals))
        task = asyncio.create_task(scraper.run(), name="signals-scrape")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def file_publisher(path: Path) -> Callable[[dict[str, BackendSignals]], None]:
    def publish(signals: dict[str, BackendSignals]) -> None:
        try:
            write_snapshot(path, signals)
        except OSError as exc:
            log.warning("cannot write the signals snapshot: %s", exc)
    return publish
