"""Retries before the first byte: a retry budget, short Retry-After penalties, and picking a
backend not tried yet for this request (upstream/forward.py calls these)."""

from __future__ import annotations

import math
import time

from gpuproxy_proxy.config import RetryConfig
from gpuproxy_proxy.routing.backends import BackendPool, BackendState
from gpuproxy_proxy.routing.hints import RequestHints


class RetryBudget:
    """Retries allowed: `ratio` of the requests of the last `window` seconds plus
    `min_per_second` * window (Linkerd's budget), counted in one-second buckets."""

    __slots__ = ("_requests", "_retries", "_second", "_window", "min_per_second", "ratio")

    def __init__(self, config: RetryConfig) -> None:
        self._window = 0
        self._requests: list[int] = []
        self._retries: list[int] = []
        self._second = 0
        self.ratio = self.min_per_second = 0.0
        self.configure(config)

    def configure(self, config: RetryConfig) -> None:
        if config.window_seconds != self._window:  # a new window: start counting afresh
            self._window = config.window_seconds
            self._requests = [0] * self._window
            self._retries = [0] * self._window
        self.ratio = config.budget_ratio
        self.min_per_second = config.min_per_second

    def _slot(self, now: float) -> int:
        second = int(now)
        if second != self._second:
            # Clear the buckets of the seconds that passed since the last call (at most all).
            for step in range(1, min(second - self._second, self._window) + 1):
                index = (self._second + step) % self._window
                self._requests[index] = self._retries[index] = 0
            self._second = second
        return second % self._window

    def request(self, now: float | None = None) -> None:
        self._requests[self._slot(time.monotonic() if now is None else now)] += 1

    def try_spend(self, now: float | None = None) -> bool:
        """Whether one more retry fits the budget (and count it when it does)."""
        slot = self._slot(time.monotonic() if now is None else now)
        allowed = (self.ratio * sum(self._requests)
                   + self.min_per_second * self._window)
        if sum(self._retries) + 1 > allowed:
            return False
        self._retries[slot] += 1
        return True


class Retrying:
    """One process's retry settings, budget and penalties (the Pipeline owns it)."""

    __slots__ = ("budget", "config", "penalties", "statuses")

    def __init__(self, config: RetryConfig) -> None:
        self.config = config
        self.statuses = frozenset(config.on_statuses)
        self.budget = RetryBudget(config)
        self.penalties = Penalties()

    def configure(self, config: RetryConfig) -> None:
        self.config = config
        self.statuses = frozenset(config.on_statuses)
        self.budget.configure(config)


class Penalties:
    """Backends that said Retry-After: kept out of the picks until then (per process)."""

    __slots__ = ("until",)

    def __init__(self) -> None:
        self.until: dict[str, float] = {}

    def add(self, name: str, retry_after: str | None, cap: float, now: float) -> None:
        seconds = parse_retry_after(retry_after)
        if seconds and cap > 0:
            self.until[name] = now + min(seconds, cap)

    def active(self, now: float) -> frozenset[str]:
        if not self.until:
            return frozenset()
        for name in [n for n, t in self.until.items() if t <= now]:
            del self.until[name]
        return frozenset(self.until)


def parse_retry_after(value: str | None) -> float:
    """Seconds of a Retry-After header (the delay form; an HTTP date counts as 1s)."""
    if not value:
        return 0.0
    try:
        seconds = float(value.strip())
    except ValueError:
        return 1.0
    return seconds if math.isfinite(seconds) and seconds > 0 else 0.0


def pick(pool: BackendPool, tried: tuple[BackendState, ...], penalized: frozenset[str],
         hints: RequestHints | None = None) -> BackendState | None:
    """A backend for the next attempt: the strategy's choice (with the request's routing
    hints) among the available backends not tried yet and not penalized."""
    if not tried and not penalized:
        return pool.choose(hints=hints)
    if len(tried) == 1 and not penalized:
        return pool.choose(exclude=tried[0], hints=hints)
    now = time.monotonic()
    if not any(b not in tried and b.name not in penalized and b.available(now)
               for b in pool.backends):
        # Everyone is penalized: the balancer's own fallback beats refusing the request.
        return None if tried else pool.choose(hints=hints)
    return pool.choose(hints=hints, avoid=tried, avoid_names=penalized)
