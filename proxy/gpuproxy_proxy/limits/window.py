"""Sliding-window-counter arithmetic and the in-process limiter (no Redis, or Redis down).

The estimate for a window W at `elapsed` into it is prev * (W - elapsed) / W + cur; the Lua
script and the local limiter decide with the same formula, and both feed `decide()`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Source = Literal["redis", "local", "open", "closed", "disabled"]


@dataclass(frozen=True, slots=True)
class Scope:
    name: Literal["ip", "user", "api_key", "key_lookup"]
    key: str
    limit: int


@dataclass(frozen=True, slots=True)
class RateLimitDecision:
    allowed: bool
    limit: int  # 0: no limit applied (disabled or failing open): no headers
    remaining: int
    reset_seconds: int
    retry_after_seconds: int
    scope: str  # the most restrictive scope ("ip", "user", "api_key", "key_lookup") or ""
    source: Source = "redis"

    @property
    def status(self) -> int:
        """The HTTP status for a rejection: 503 when failing closed, else 429."""
        return 503 if self.source == "closed" else 429


UNLIMITED = RateLimitDecision(True, 0, 0, 0, 0, "", "disabled")


def _retry_after_ms(limit: int, cur: int, prev: int, elapsed: int, window: int) -> float:
    """Milliseconds until one more request fits under `limit`."""
    if prev > 0 and cur + 1 <= limit:
        # Still in this window, once the previous window's weight has decayed enough.
        return max(0.0, window - elapsed - (limit - 1 - cur) * window / prev)
    # Next window: this window's count becomes the decaying previous one.
    return window - elapsed + max(0.0, window * (1 - (limit - 1) / cur)) if cur else 0.0


def decide(
    scopes: Sequence[Scope],
    allowed: bool,
    elapsed_ms: int,
    counts: Sequence[tuple[int, int]],
    window_ms: int,
    source: Source,
) -> RateLimitDecision:
    """Combine per-scope (cur, prev) counts into the most restrictive scope's decision."""
    weight = (window_ms - elapsed_ms) / window_ms
    reset = max(1, math.ceil((window_ms - elapsed_ms) / 1000))
    if allowed:
        # The hot path: find the tightest scope first, build one decision.
        tightest: tuple[int, int, Scope] | None = None
        for scope, (cur, prev) in zip(scopes, counts, strict=True):
            remaining = max(0, math.floor(scope.limit - (prev * weight + cur)))
            if tightest is None or (remaining, scope.limit) < tightest[:2]:
                tightest = (remaining, scope.limit, scope)
        if tightest is not None:
            remaining, limit, scope = tightest
            return RateLimitDecision(True, limit, remaining, reset, 0, scope.name, source)
    best: RateLimitDecision | None = None
    for scope, (cur, prev) in zip(scopes, counts, strict=True):
        estimate = prev * weight + cur
        if estimate + 1 > scope.limit:
            wait = _retry_after_ms(scope.limit, cur, prev, elapsed_ms, window_ms)
            retry = max(1, math.ceil(wait / 1000))
            candidate = RateLimitDecision(False, scope.limit, 0, reset, retry, scope.name, source)
            # The request passes only when every scope does: report the longest wait.
            if best is None or retry > best.retry_after_seconds:
                best = candidate
    if best is None:
        # Redis' float arithmetic disagreed at the boundary: reject on the tightest scope.
        scope = min(scopes, key=lambda s: s.limit)
        best = RateLimitDecision(False, scope.limit, 0, reset, 1, scope.name, source)
    return best


class LocalWindowLimiter:
    """Per-process sliding-window counters with the same semantics as the Lua script."""

    def __init__(self, window_seconds: int, max_keys: int = 200_000) -> None:
        self._window_ms = window_seconds * 1000
        self._max_keys = max_keys
        # key -> [window id, count in that window, count in the window before]
        self._counters: dict[str, list[int]] = {}

    def check(self, scopes: Sequence[Scope], now: float | None = None) -> RateLimitDecision:
        now_ms = int((time.time() if now is None else now) * 1000)
        window = now_ms // self._window_ms
        elapsed = now_ms - window * self._window_ms
        weight = (self._window_ms - elapsed) / self._window_ms
        entries = [self._entry(s.key, window) for s in scopes]
        allowed = all(
            e[2] * weight + e[1] + 1 <= s.limit for s, e in zip(scopes, entries, strict=True)
        )
        if allowed:
            for e in entries:
                e[1] += 1
        counts = [(e[1], e[2]) for e in entries]
        return decide(scopes, allowed, elapsed, counts, self._window_ms, "local")

    def _entry(self, key: str, window: int) -> list[int]:
        entry = self._counters.get(key)
        if entry is None:
            if len(self._counters) >= self._max_keys:
                self._prune(window)
            entry = self._counters[key] = [window, 0, 0]
        elif entry[0] != window:
            entry[2] = entry[1] if entry[0] == window - 1 else 0
            entry[0], entry[1] = window, 0
        return entry

    def _prune(self, window: int) -> None:
        stale = [k for k, e in self._counters.items() if e[0] < window - 1]
        for k in stale:
            del self._counters[k]
        # Still full of live keys: forget the oldest half rather than grow without bound.
        if len(self._counters) >= self._max_keys:
            for k in list(self._counters)[: self._max_keys // 2]:
                del self._counters[k]

    def __len__(self) -> int:
        return len(self._counters)
