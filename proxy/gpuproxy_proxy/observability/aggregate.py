"""Pure merging of per-worker /stats JSON and /metrics text into one view of the whole pod."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

# Per-process views of the same fact: the pod value is the best one, not the sum (and the
# oldest spool segment of the pod is its oldest worker's)...
_MAX_FAMILIES = frozenset({
    "gpuproxy_backend_healthy", "gpuproxy_metering_spool_oldest_seconds",
    "gpuproxy_backend_queue_depth", "gpuproxy_backend_running_requests",
    "gpuproxy_backend_kv_cache_usage", "gpuproxy_backend_prefix_cache_hit_rate",
    "gpuproxy_backend_signals_age_seconds",
})
# ...or the worst one: a dependency one worker cannot reach is a problem of the pod.
# The certificate expiring first is the one to renew.
_MIN_FAMILIES = frozenset({"gpuproxy_dependency_up",
                           "gpuproxy_tls_certificate_expiry_timestamp_seconds"})


class _Static(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def merge_metrics(texts: Iterable[str]) -> bytes:
    """Sum counters, gauges and histogram series over workers (min for *_created)."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for fam in text_string_to_metric_families(text):
            if fam.name not in families:
                families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                values[fam.name] = {}
            series = values[fam.name]
            use_max = fam.name in _MAX_FAMILIES
            use_min = fam.name in _MIN_FAMILIES
            for sample in fam.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                old = series.get(key)
                if old is None:
                    series[key] = sample.value
                elif sample.name.endswith("_created"):
                    series[key] = min(old, sample.value)
                elif use_max:
                    series[key] = max(old, sample.value)
                elif use_min:
                    series[key] = min(old, sample.value)
                else:
                    series[key] = old + sample.value
    merged = []
    for name, fam in families.items():
        for (sample_name, labels), value in values[name].items():
            fam.add_sample(sample_name, dict(labels), value)
        merged.append(fam)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Static(merged))
    return generate_latest(registry)


_BACKEND_SUMS = ("in_flight",)
_STATE_RANK = {"healthy": 0, "half_open": 1, "ejected": 2, "unhealthy": 3}


def _newer(signals: dict[str, Any], than: Any) -> bool:
    if not isinstance(than, dict):
        return True
    age, other = signals.get("age_seconds"), than.get("age_seconds")
    return other is None or (age is not None and age < other)


def merge_stats(workers: Sequence[dict[str, Any]], draining: bool = False) -> dict[str, Any]:
    """The pod's /stats: totals over workers, per-backend sums and the per-worker breakdown."""
    backends: dict[str, dict[str, Any]] = {}
    for stats in workers:
        for name, info in stats.get("backends", {}).items():
            entry = backends.setdefault(name, {
                "in_flight": 0, "states": {}, "healthy_workers": 0, "weight": info.get("weight"),
                "ewma_ms": None,
            })
            entry["in_flight"] += int(info.get("in_flight", 0))
            state = str(info.get("state", "unknown"))
            entry["states"][state] = entry["states"].get(state, 0) + 1
            if state in ("healthy", "half_open"):
                entry["healthy_workers"] += 1
            # The pod's engine signals (one scraper; every worker reads its snapshot): the
            # newest any worker holds.
            signals = info.get("signals")
            if isinstance(signals, dict) and _newer(signals, entry.get("signals")):
                entry["signals"] = signals
            ewma_ms = info.get("ewma_ms")
            if isinstance(ewma_ms, int | float):
                prev = entry["ewma_ms"]
                entry["ewma_ms"] = ewma_ms if prev is None else max(prev, ewma_ms)
    for entry in backends.values():
        # Worst state any worker sees, so an operator notices a partial outage.
        entry["state"] = max(entry["states"], key=lambda s: _STATE_RANK.get(s, 4))
    dependencies: dict[str, bool] = {}
    for stats in workers:
        for name, up in (stats.get("dependencies") or {}).items():
            dependencies[name] = dependencies.get(name, True) and bool(up)
    return {
        "connections_active": sum(int(w.get("connections_active", 0)) for w in workers),
        "requests_in_flight": sum(int(w.get("requests_in_flight", 0)) for w in workers),
        "connections_rejected": sum(int(w.get("connections_rejected", 0)) for w in workers),
        "workers": len(workers),
        "draining": draining or any(bool(w.get("draining")) for w in workers),
        "config_generation": max((int(w.get("config_generation", 0)) for w in workers),
                                 default=0),
        "backends": backends,
        "dependencies": dependencies,
        "gc_max_pause_ms": max((float((w.get("gc") or {}).get("max_pause_ms", 0.0))
                                for w in workers), default=0.0),
        # The pod's admission queue: a scaling signal (gpuproxy_admission_queue_depth too).
        "admission_queue_depth": sum(int((w.get("admission") or {}).get("queue_depth", 0))
                                     for w in workers),
        "per_worker": [
            {key: w.get(key) for key in ("pid", "worker", "connections_active",
                                         "requests_in_flight", "draining", "config_generation",
                                         "dependencies", "gc", "admission")}
            for w in workers
        ],
    }
