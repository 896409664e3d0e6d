"""gc.freeze without a leak: garbage that frozen objects become is reclaimed at a bounded rate,
and the frozen count is exported."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from gpuproxy_proxy.observability.metrics import ProxyMetrics
from gpuproxy_proxy.process.gcwatch import RECLAIM_GROWTH, PeriodicFreezer


class Node:
    """A cycle of one: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


class Leaf:
    """Tracked by the collector but in no cycle: reference counting frees it."""

    def __init__(self) -> None:
        self.items: list[int] = []


@pytest.fixture
def frozen_heap() -> Iterator[None]:
    """Warm-up as the worker does it, and the collector as it was afterwards."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.collect()


def test_garbage_frozen_while_alive_is_reclaimed_at_a_bounded_rate(frozen_heap: None) -> None:
    freezer = PeriodicFreezer(0.0, min_seconds=60.0, max_seconds=900.0)
    holder = [Node()]  # a connection, say: alive when the freezer runs
    ref = weakref.ref(holder[0])
    freezer.step(1.0)
    holder.clear()  # closed: cyclic garbage inside the permanent generation now
    for now in (2.0, 30.0, 59.0):
        freezer.step(now)
        assert ref() is not None  # young collections never see it; no full one this soon
    assert freezer.reclaims == 0
    freezer.step(900.0)
    assert ref() is None
    assert freezer.reclaims == 1


def test_frozen_count_stays_bounded_over_repeated_cycles(frozen_heap: None) -> None:
    freezer = PeriodicFreezer(0.0, min_seconds=60.0, max_seconds=3600.0)
    baseline = gc.get_freeze_count()
    per_cycle = max(50_000, baseline // 2)  # garbage well above the growth share each time
    now = 0.0
    peak = 0
    cycles = 6
    for _ in range(cycles):
        holder = [Node() for _ in range(per_cycle)]  # open while the freezer runs...
        now += 61.0
        freezer.step(now)
        holder.clear()  # ...then closed
        now += 61.0
        freezer.step(now)
        peak = max(peak, gc.get_freeze_count())
    assert freezer.reclaims >= cycles - 1
    # Freezing without reclaiming would reach baseline + cycles * per_cycle.
    assert peak <= baseline * (1 + RECLAIM_GROWTH) + 2 * per_cycle
    assert gc.get_freeze_count() <= baseline * (1 + RECLAIM_GROWTH) + per_cycle


def test_young_steps_freeze_survivors_between_reclaims(frozen_heap: None) -> None:
    freezer = PeriodicFreezer(0.0, min_seconds=60.0, max_seconds=900.0)
    before = gc.get_freeze_count()
    survivors = [Node() for _ in range(1000)]
    freezer.step(10.0)
    assert gc.get_freeze_count() >= before + len(survivors)
    assert freezer.reclaims == 0


def test_frozen_objects_gauge_is_read_at_scrape_time(frozen_heap: None) -> None:
    metrics = ProxyMetrics()
    assert metrics.registry.get_sample_value("gpuproxy_gc_frozen_objects") == float(
        gc.get_freeze_count())
    gc.unfreeze()
    assert metrics.registry.get_sample_value("gpuproxy_gc_frozen_objects") == 0.0


def test_growth_that_more_connections_explain_never_pauses_for_a_reclaim(
    frozen_heap: None,
) -> None:
    open_connections = [0]
    freezer = PeriodicFreezer(0.0, min_seconds=60.0, connections=lambda: open_connections[0])
    baseline = gc.get_freeze_count()
    per_step = max(20_000, baseline // 2)  # each step alone is above the growth share
    held: list[Leaf] = []
    now = 0.0
    for _ in range(5):  # a ramp-up: the heap grows with the open connections
        held.extend(Leaf() for _ in range(per_step))
        open_connections[0] += 10_000
        now += 61.0
        freezer.step(now)
    assert freezer.reclaims == 0
    assert gc.get_freeze_count() >= baseline + 5 * per_step  # frozen, so never walked
    # A ramp-down whose objects die by reference counting: the count follows, nothing is due.
    del held[: 2 * per_step]
    open_connections[0] -= 20_000
    now += 61.0
    freezer.step(now)
    assert freezer.reclaims == 0
    # A ramp-down that leaves cyclic garbage frozen: judged by the learned cost per connection.
    leaky = [Node() for _ in range(6 * per_step)]  # garbage beyond the growth share
    open_connections[0] += 20_000
    now += 61.0
    freezer.step(now)  # open and frozen
    leaky.clear()
    open_connections[0] -= 20_000
    now += 61.0
    freezer.step(now)
    assert freezer.reclaims == 1
