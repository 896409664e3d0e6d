"""Load-balancing strategies: pure objects that pick one backend among healthy candidates.

They never look at health themselves; the caller passes only the backends that may take traffic.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol, TypeVar

from gpuproxy_proxy.config import Strategy


class Candidate(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def weight(self) -> int: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def ewma_ms(self) -> float | None: ...


C = TypeVar("C", bound=Candidate)


class Balancer(Protocol):
    def pick(self, candidates: Sequence[C]) -> C | None: ...


class RoundRobin:
    """Each candidate in turn; the cursor survives candidates coming and going."""

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 0

    def pick(self, candidates: Sequence[C]) -> C | None:
        if not candidates:
            return None
        choice = candidates[self._next % len(candidates)]
        self._next += 1
        return choice


class SmoothWeightedRoundRobin:
    """nginx's smooth WRR: weights 5,1,1 give a a b a c a a, never long runs of one backend."""

    __slots__ = ("_current",)

    def __init__(self) -> None:
        self._current: dict[str, int] = {}

    def pick(self, candidates: Sequence[C]) -> C | None:
        if not candidates:
            return None
        current = self._current
        total = 0
        best: C | None = None
        best_weight = 0
        for cand in candidates:
            weight = current.get(cand.name, 0) + cand.weight
            current[cand.name] = weight
            total += cand.weight
            if best is None or weight > best_weight:
                best, best_weight = cand, weight
        assert best is not None
        current[best.name] = best_weight - total
        if len(current) > 4 * len(candidates):
            # Backends removed by a reload leave stale entries; drop them.
            names = {c.name for c in candidates}
            for name in [n for n in current if n not in names]:
                del current[name]
        return best


class LeastConnections:
    """Fewest requests in flight; ties broken round-robin so equal backends share evenly."""

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 0

    def pick(self, candidates: Sequence[C]) -> C | None:
        count = len(candidates)
        if count == 0:
            return None
        start = self._next % count
        self._next += 1
        best = candidates[start]
        best_load = best.in_flight
        for offset in range(1, count):
            cand = candidates[(start + offset) % count]
            if cand.in_flight < best_load:
                best, best_load = cand, cand.in_flight
        return best


class LeastResponseTime:
    """Lowest latency EWMA scaled by load (ewma * (in_flight + 1)), like a peak-EWMA balancer.

    Scaling by load keeps the fastest backend from taking everything until it slows down.
    Backends without a measurement yet are tried first, in turn.
    """

    __slots__ = ("_rr",)

    def __init__(self) -> None:
        self._rr = RoundRobin()

    def pick(self, candidates: Sequence[C]) -> C | None:
        if not candidates:
            return None
        untested = [c for c in candidates if c.ewma_ms is None]
        if untested:
            return self._rr.pick(untested)
        best: C | None = None
        best_score = 0.0
        for cand in candidates:
            assert cand.ewma_ms is not None
            score = cand.ewma_ms * (cand.in_flight + 1)
            if best is None or score < best_score:
                best, best_score = cand, score
        return best


class EqualWeighted:
    """Uniformly random among the candidates."""

    __slots__ = ("_random",)

    def __init__(self, rng: random.Random | None = None) -> None:
        self._random = rng or random.Random()  # noqa: S311 - load spreading, not security

    def pick(self, candidates: Sequence[C]) -> C | None:
        if not candidates:
            return None
        return candidates[self._random.randrange(len(candidates))]


def make_balancer(strategy: Strategy, rng: random.Random | None = None) -> Balancer:
    if strategy == "round_robin":
        return RoundRobin()
    if strategy == "weighted_round_robin":
        return SmoothWeightedRoundRobin()
    if strategy == "least_connections":
        return LeastConnections()
    if strategy == "least_response_time":
        return LeastResponseTime()
    return EqualWeighted(rng)


def ewma(previous: float | None, sample: float, alpha: float) -> float:
    """Exponentially weighted moving average; the first sample seeds it."""
    if previous is None:
        return sample
    return alpha * sample + (1.0 - alpha) * previous
