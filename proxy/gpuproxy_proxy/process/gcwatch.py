"""GC control for many long-lived connections: freeze survivors, reclaim, measure the pauses.

Full collections walk every tracked object; with tens of thousands of connections that is
hundreds of milliseconds. Objects that survived warm-up (and later, young collections) are moved
to the permanent generation with `gc.freeze()`, so collections only walk recent objects; a
rare, rate-limited full collection of everything (frozen included) reclaims the cyclic garbage
that frozen objects became since, so the permanent generation does not grow without bound.
"""

from __future__ import annotations

import asyncio
import bisect
import gc
import time
from collections.abc import Callable, Iterator
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
# a pause (measured: up to 200 ms while 15k connections ramp up). The freezer's rate-limited
# reclaim (below) replaces it.
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


# A frozen object that later becomes cyclic garbage (a closed connection's cycles) is never
# collected while frozen. Everything is unfrozen and collected once the frozen count grew by
# this share (CPython's own rule for its oldest generation) while the open connections did not:
# growth that more connections explain is live memory, and collecting it would only pause.
RECLAIM_GROWTH = 0.25
# Not more often than this: that one collection walks the whole heap. Measured on a loaded
# 2-core machine with aiohttp's server holding idle keep-alive connections (~40 tracked objects
# each): 25 ms with none, 130 ms with 5k, 220 ms with 10k, ~20 us per connection; it shows in
# gpuproxy_gc_pause_milliseconds{generation="2"}. The lean front end's connections leave almost
# no cycles: each closed one left 0.06-0.26 objects in the permanent generation
# (`bench/gc_churn.py`, 3000 connections a cycle), so at 100k open connections a reclaim comes
# after millions of closed ones.
RECLAIM_MIN_SECONDS = 60.0
# The open-connection count moves by this much before it re-bases the growth rule, so a few
# connections more or less do not hide garbage.
_CONNECTIONS_SLACK = 100
# gc.get_freeze_count() walks the whole permanent generation (~4 ns an object: ~5 ms at 100k
# connections), so the rule looks this often, not at every freeze.
CHECK_SECONDS = 30.0


class PeriodicFreezer:
    """One step per interval: collect the young generations and freeze their survivors, or,
    when due, unfreeze everything, collect it whole and freeze what is still alive."""

    def __init__(self, now: float, *, growth: float = RECLAIM_GROWTH,
                 min_seconds: float = RECLAIM_MIN_SECONDS,
                 max_seconds: float | None = None,
                 connections: Callable[[], int] = lambda: 0) -> None:
        self.growth = growth
        self.min_seconds = min_seconds
        # Optional: a reclaim at least this often, whatever the growth (off by default: a full
        # collection of a big heap is the pause the freezer exists to avoid).
        self.max_seconds = max_seconds
        self.connections = connections
        self.per_connection = 0.0  # frozen objects one open connection adds, once measured
        self.last_reclaim = now
        self.last_check = now
        self.reclaims = 0
        self._rebase()

    def _rebase(self) -> None:
        self.baseline = gc.get_freeze_count()  # frozen objects at the last reclaim or ramp-up
        self.baseline_connections = self.connections()

    def expected(self, open_now: int) -> float:
        """Frozen objects the open connections explain, from the last baseline."""
        return self.baseline + self.per_connection * (open_now - self.baseline_connections)

    def due(self, now: float) -> bool:
        waited = now - self.last_reclaim
        if self.max_seconds is not None and waited >= self.max_seconds:
            return True
        open_now = self.connections()
        base = self.baseline_connections
        frozen = gc.get_freeze_count()
        if open_now - base > max(_CONNECTIONS_SLACK, base * self.growth):
            # A ramp-up: the heap grows with the connections. Learn what one costs, and
            # measure from here (a ramp-down is judged by that cost, so its garbage shows).
            self.per_connection = max(0.0, (frozen - self.baseline) / (open_now - base))
            self._rebase()
            return False
        return (waited >= self.min_seconds
                and frozen > max(self.expected(open_now), 0.0) * (1.0 + self.growth)
                + _CONNECTIONS_SLACK * self.per_connection)

    def step(self, now: float) -> None:
        # Young generations are cheap to collect; their survivors (connections, buffers) then
        # move to the permanent generation, so no collection walks them until a reclaim. The
        # rule looks after the freeze, so the count covers everything alive right now.
        gc.collect(1)
        gc.freeze()
        if now - self.last_check < CHECK_SECONDS:
            return
        self.last_check = now
        if self.due(now):
            self.reclaim(now)

    def reclaim(self, now: float) -> None:
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        self.last_reclaim = now
        self.reclaims += 1
        self._rebase()


async def freeze_periodically(interval: float, *, connections: Callable[[], int],
                              min_seconds: float = RECLAIM_MIN_SECONDS) -> None:
    loop = asyncio.get_running_loop()
    freezer = PeriodicFreezer(loop.time(), min_seconds=min_seconds, connections=connections)
    while True:
        await asyncio.sleep(interval)
        freezer.step(loop.time())
