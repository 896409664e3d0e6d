"""A client-side token bucket for API requests, like client-go's (QPS refill, `burst` capacity):
bursts of reconciles (a restart with hundreds of clusters) queue here, not at the API server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class TokenBucket:
    """`qps` tokens per second, at most `burst` saved up; qps <= 0 means unlimited.

    Waiters reserve their token at once (the level may go negative), as golang.org/x/time/rate's
    Wait does, so concurrent callers are spaced 1/qps apart without a lock or a queue."""

    def __init__(self, qps: float, burst: int, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.qps = qps
        self.burst = max(1, burst)
        self._clock = clock
        self._tokens = float(self.burst)
        self._last = clock()

    def reserve(self) -> float:
        """Take a token; return how long the caller must wait before using it."""
        if self.qps <= 0:
            return 0.0
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.qps)
        self._last = now
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self.qps

    async def acquire(self) -> float:
        """Wait for a token; returns the time waited (for metrics and tests)."""
        delay = self.reserve()
        if delay > 0:
            await asyncio.sleep(delay)
        return delay
