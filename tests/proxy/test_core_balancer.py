"""Distribution of each load-balancing strategy (pure, no I/O)."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from gpuproxy_proxy.routing.balancer import (
    EqualWeighted,
    LeastConnections,
    LeastResponseTime,
    RoundRobin,
    SmoothWeightedRoundRobin,
    ewma,
    make_balancer,
)


@dataclass
class Cand:
    name: str
    weight: int = 1
    in_flight: int = 0
    ewma_ms: float | None = None


def names(picks: list[Cand | None]) -> list[str]:
    return [p.name if p else "-" for p in picks]


def test_round_robin_cycles_in_order() -> None:
    cands = [Cand("a"), Cand("b"), Cand("c")]
    rr = RoundRobin()
    assert names([rr.pick(cands) for _ in range(7)]) == ["a", "b", "c", "a", "b", "c", "a"]
    assert rr.pick([]) is None


def test_smooth_weighted_round_robin_matches_nginx_sequence() -> None:
    cands = [Cand("a", weight=5), Cand("b", weight=1), Cand("c", weight=1)]
    wrr = SmoothWeightedRoundRobin()
    # nginx's documented smooth sequence for weights 5/1/1.
    assert "".join(names([wrr.pick(cands) for _ in range(7)])) == "aabacaa"


def test_weighted_round_robin_distribution_follows_weights() -> None:
    cands = [Cand("a", weight=3), Cand("b", weight=2), Cand("c", weight=1)]
    wrr = SmoothWeightedRoundRobin()
    counts = Counter(names([wrr.pick(cands) for _ in range(600)]))
    assert counts == {"a": 300, "b": 200, "c": 100}


def test_least_connections_prefers_idle_backend() -> None:
    busy, idle = Cand("busy", in_flight=5), Cand("idle", in_flight=1)
    lc = LeastConnections()
    assert {lc.pick([busy, idle]).name for _ in range(10)} == {"idle"}  # type: ignore[union-attr]


def test_least_connections_ties_are_round_robin() -> None:
    cands = [Cand("a"), Cand("b"), Cand("c")]
    lc = LeastConnections()
    counts = Counter(names([lc.pick(cands) for _ in range(300)]))
    assert counts == {"a": 100, "b": 100, "c": 100}


def test_least_connections_balances_when_requests_stay_open() -> None:
    cands = [Cand("a"), Cand("b")]
    lc = LeastConnections()
    for _ in range(10):
        choice = lc.pick(cands)
        assert choice is not None
        choice.in_flight += 1
    assert [c.in_flight for c in cands] == [5, 5]


def test_least_response_time_tries_untested_backends_first() -> None:
    measured, fresh1, fresh2 = Cand("m", ewma_ms=1.0), Cand("f1"), Cand("f2")
    lrt = LeastResponseTime()
    picks = names([lrt.pick([measured, fresh1, fresh2]) for _ in range(4)])
    assert picks == ["f1", "f2", "f1", "f2"]


def test_least_response_time_favours_faster_backend_by_load() -> None:
    fast, slow = Cand("fast", ewma_ms=10.0), Cand("slow", ewma_ms=40.0)
    lrt = LeastResponseTime()
    counts: Counter[str] = Counter()
    for _ in range(50):
        choice = lrt.pick([fast, slow])
        assert choice is not None
        choice.in_flight += 1  # requests stay open: load shifts the score
        counts[choice.name] += 1
    # Score is ewma * (in_flight + 1): fast takes ~4x the load of slow.
    assert counts["fast"] == 40
    assert counts["slow"] == 10


def test_equal_weighted_is_uniform_and_ignores_weights() -> None:
    cands = [Cand("a", weight=100), Cand("b"), Cand("c")]
    eq = EqualWeighted(random.Random(42))
    counts = Counter(names([eq.pick(cands) for _ in range(3000)]))
    for name in "abc":
        assert 850 < counts[name] < 1150, counts


def test_make_balancer_and_ewma() -> None:
    assert isinstance(make_balancer("weighted_round_robin"), SmoothWeightedRoundRobin)
    assert isinstance(make_balancer("equal_weighted"), EqualWeighted)
    assert ewma(None, 100.0, 0.3) == 100.0
    assert ewma(100.0, 200.0, 0.5) == 150.0
