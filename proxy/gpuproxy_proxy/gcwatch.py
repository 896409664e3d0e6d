"""GC control for many long-lived connections: freeze survivors, and measure every pause.

Full collections walk every tracked object; with tens of thousands of connections that is
hundreds of milliseconds. Objects that survived warm-up (and later, young collections) are moved
to the permanent generation with `gc.freeze()`, so collections only walk recent objects.
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

from gpuproxy_proxy.metrics import ProxyMetrics


class GcMonitor:
    """Times each collection through `gc.callbacks` (installed while the worker runs).

    Thread CPU time, not wall time: collecting is pure CPU work, and on a busy host wall time
    would also count the moments the OS ran another process mid-collection.
    """

    def __init__(self, metrics: ProxyMetrics) -> None:
        self._children = [metrics.gc_pause_ms.labels(str(gen)) for gen in range(3)]
        self._started = 0.0
        self.collections = 0
        self.max_pause_ms = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.thread_time()
            return
        pause_ms = (time.thread_time() - self._started) * 1000.0
        self.collections += 1
        self.max_pause_ms = max(self.max_pause_ms, pause_ms)
        self._children[min(int(info.get("generation", 2)), 2)].observe(pause_ms)

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
