"""GC control for many long-lived connections: freeze survivors, and measure the pauses.

Full collections walk every tracked object; with tens of thousands of connections that is
hundreds of milliseconds. Objects that survived warm-up (and later, young collections) are moved
to the permanent generation with `gc.freeze()`, so collections only walk recent objects.
"""

from __future__ import annotations

import asyncio
import bisect
import gc
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

from gpuproxy_proxy.observability.metrics import GC_BUCKETS_MS, ProxyMetrics

_GENERATIONS = 3


class GcMonitor(Collector):
    """Times collections of generations 1 and 2 through `gc.callbacks` (installed while the
    worker runs) and exports them as `gpuproxy_gc_pause_milliseconds` when scraped.

    Generation 0 runs thousands of times a second under load and is cheap; timing it cost 4-5%
    of the CPU (bench/README.md), so it is skipped. The callback only touches plain numbers: no
    lock, no metric object, no syscall (`perf_counter` is a vDSO read).
    """

    def __init__(self, metrics: ProxyMetrics) -> None:
        self._started = 0.0
        self.collections = 0
        self.max_pause_ms = 0.0
        # Per generation: non-cumulative bucket counts (last one is +Inf), and the pause sum.
        self._buckets = [[0] * (len(GC_BUCKETS_MS) + 1) for _ in range(_GENERATIONS)]
        self._sums = [0.0] * _GENERATIONS
        metrics.registry.register(self)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        generation = info.get("generation", 2)
        if not generation:
            return
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause_ms = (time.perf_counter() - self._started) * 1000.0
        self.collections += 1
        if pause_ms > self.max_pause_ms:
            self.max_pause_ms = pause_ms
        generation = min(generation, 2)
        self._buckets[generation][bisect.bisect_left(GC_BUCKETS_MS, pause_ms)] += 1
        self._sums[generation] += pause_ms

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(
            "gpuproxy_gc_pause_milliseconds",
            "Garbage-collector pauses of this process, by generation (generation 0 is not "
            "timed: too frequent and too short to be worth its cost).",
            labels=["generation"],
        )
        for generation in range(_GENERATIONS):
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            counts = self._buckets[generation]
            for bound, count in zip(GC_BUCKETS_MS, counts, strict=False):
                cumulative += count
                buckets.append((str(bound), float(cumulative)))
            cumulative += counts[-1]
            buckets.append(("+Inf", float(cumulative)))
            family.add_metric([str(generation)], buckets, self._sums[generation])
        yield family

    def install(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def snapshot(self) -> dict[str, Any]:
        return {"collections": self.collections, "max_pause_ms": round(self.max_pause_ms, 3),
                "frozen_objects": gc.get_freeze_count()}


def freeze_after_warmup() -> None:
    gc.collect()
    gc.freeze()


# With survivors frozen every few seconds the oldest generation only ever holds objects that
# got old since the last freeze; an automatic full collection would walk them for nothing but
# a pause (measured: up to 200 ms while 15k connections ramp up). The freezer replaces it.
_NO_AUTO_FULL = 1_000_000


class FullCollectionsOff:
    """Turns automatic full collections off while the periodic freezer runs; restores after."""

    def __init__(self) -> None:
        self._saved: tuple[int, int, int] | None = None

    def disable(self) -> None:
        if self._saved is None:
            self._saved = gc.get_threshold()
            gen0, gen1, _ = self._saved
            gc.set_threshold(gen0, gen1, _NO_AUTO_FULL)

    def restore(self) -> None:
        if self._saved is not None:
            gc.set_threshold(*self._saved)
            self._saved = None


async def freeze_periodically(interval: float) -> None:
    # Young generations are cheap to collect; their survivors (connections, buffers) then move
    # to the permanent generation, so a full collection never walks them. Cyclic garbage that
    # was already old when frozen is not reclaimed: the price of bounded pauses.
    while True:
        await asyncio.sleep(interval)
        gc.collect(1)
        gc.freeze()
