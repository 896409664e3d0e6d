"""A backend's engine signals as others see them: its gauges (read at scrape time) and its
entry in /stats."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from gpuproxy_proxy.observability.metrics import ProxyMetrics
from gpuproxy_proxy.routing.signals import BackendSignals

Current = Callable[[], BackendSignals | None]


def _gauges(metrics: ProxyMetrics) -> tuple[Any, ...]:
    return (metrics.backend_queue_depth, metrics.backend_running, metrics.backend_kv_cache_usage,
            metrics.backend_prefix_hit_rate, metrics.backend_signals_age)


def register_gauges(metrics: ProxyMetrics, name: str, current: Current,
                    max_age: Callable[[], float]) -> None:
    """Gauges read at scrape time: no work per request, 0 while the signal is not fresh."""

    def field(read: Callable[[BackendSignals], float | None]) -> Callable[[], float]:
        def value() -> float:
            sig = current()
            if sig is None or not sig.fresh(time.monotonic(), max_age()):
                return 0.0
            return float(read(sig) or 0.0)
        return value

    def age() -> float:
        sig = current()
        if sig is None or not sig.scraped_at:
            return math.inf
        return max(0.0, time.monotonic() - sig.scraped_at)

    reads = (field(lambda s: s.waiting), field(lambda s: s.running),
             field(lambda s: s.kv_usage), field(lambda s: s.prefix_hit_rate), age)
    for gauge, read in zip(_gauges(metrics), reads, strict=True):
        gauge.labels(name).set_function(read)


def remove_gauges(metrics: ProxyMetrics, name: str) -> None:
    for gauge in _gauges(metrics):
        gauge.remove(name)


def describe(sig: BackendSignals | None, in_flight_change: int, now: float,
             max_age: float) -> dict[str, Any] | None:
    """The signals part of a backend's /stats entry."""
    if sig is None:
        return None
    return {
        "engine": sig.engine, "waiting": sig.waiting, "running": sig.running,
        "kv_cache_usage": sig.kv_usage, "prefix_cache_hit_rate": sig.prefix_hit_rate,
        "prefix_cache_hits": sig.prefix_hits, "prefix_cache_queries": sig.prefix_queries,
        "age_seconds": round(now - sig.scraped_at, 3) if sig.scraped_at else None,
        "fresh": sig.fresh(now, max_age),
        "models": None if sig.models is None else list(sig.models),
        "models_age_seconds": round(now - sig.models_at, 3) if sig.models_at else None,
        "in_flight_since_scrape": in_flight_change, "error": sig.error,
    }
