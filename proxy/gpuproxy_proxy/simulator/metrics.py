"""`/metrics` in vLLM's Prometheus format, read from the engine at scrape time.

Names and labels follow vLLM v0.10 (V1 engine, `vllm/v1/metrics/loggers.py`): labels
`model_name` and `engine`, `finished_reason` on `vllm:request_success_total`, the deprecated
`vllm:gpu_cache_usage_perc` / `vllm:gpu_prefix_cache_*` still exported next to their new names.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from gpuproxy_proxy.simulator.engine import EngineStats

# vLLM v0.10's bucket edges for these two histograms.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
FINISHED_REASONS = ("stop", "length", "abort")


class HistogramCounts:
    """Cumulative-bucket histogram state (observations in simulated seconds)."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self._counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus buckets: (le, cumulative count), ending with +Inf."""
        running, out = 0, []
        for edge, count in zip((*map(str, self.buckets), "+Inf"), self._counts, strict=True):
            running += count
            out.append((edge, float(running)))
        return out


class VllmCollector(Collector):
    """Yields vLLM-named families from a stats snapshot and the request-latency histograms."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats],
                 ttft: HistogramCounts, e2e: HistogramCounts) -> None:
        self._labels = [model_name, "0"]
        self._stats = stats
        self._ttft = ttft
        self._e2e = e2e

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=["model_name", "engine"])
        family.add_metric(self._labels, value)
        return family

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(name, doc, labels=["model_name", "engine"])
        family.add_metric(self._labels, value)
        return family

    def _histogram(self, name: str, doc: str, hist: HistogramCounts) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, doc, labels=["model_name", "engine"])
        family.add_metric(self._labels, hist.cumulative(), sum_value=hist.total)
        return family

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        yield self._gauge("vllm:num_requests_running",
                          "Number of requests in model execution batches.", stats.running)
        yield self._gauge("vllm:num_requests_waiting",
                          "Number of requests waiting to be processed.", stats.waiting)
        yield self._gauge("vllm:gpu_cache_usage_perc",
                          "GPU KV-cache usage. 1 means 100 percent usage."
                          "DEPRECATED: Use vllm:kv_cache_usage_perc instead.", stats.kv_usage)
        yield self._gauge("vllm:kv_cache_usage_perc",
                          "KV-cache usage. 1 means 100 percent usage.", stats.kv_usage)
        for prefix in ("vllm:prefix_cache", "vllm:gpu_prefix_cache"):
            yield self._counter(f"{prefix}_queries",
                                "Prefix cache queries, in terms of number of queried tokens.",
                                stats.prefix_queries)
            yield self._counter(f"{prefix}_hits",
                                "Prefix cache hits, in terms of number of cached tokens.",
                                stats.prefix_hits)
        yield self._counter("vllm:num_preemptions",
                            "Cumulative number of preemption from the engine.", 0)
        yield self._counter("vllm:prompt_tokens", "Number of prefill tokens processed.",
                            stats.prompt_tokens)
        yield self._counter("vllm:generation_tokens", "Number of generation tokens processed.",
                            stats.generation_tokens)
        success = CounterMetricFamily("vllm:request_success",
                                      "Count of successfully processed requests.",
                                      labels=["model_name", "engine", "finished_reason"])
        for reason in FINISHED_REASONS:
            success.add_metric([*self._labels, reason], stats.finished.get(reason, 0))
        yield success
        yield self._histogram("vllm:time_to_first_token_seconds",
                              "Histogram of time to first token in seconds.", self._ttft)
        yield self._histogram("vllm:e2e_request_latency_seconds",
                              "Histogram of e2e request latency in seconds.", self._e2e)


class SimulatorMetrics:
    """One server's registry (no process-global registry, so instances stay independent)."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats]) -> None:
        self.ttft = HistogramCounts(TTFT_BUCKETS)
        self.e2e = HistogramCounts(E2E_BUCKETS)
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(VllmCollector(model_name, stats, self.ttft, self.e2e))

    def render(self) -> bytes:
        return generate_latest(self._registry)
