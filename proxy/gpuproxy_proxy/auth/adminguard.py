"""Failed admin authentication, per client IP: after a few failures each further one locks the
IP out for twice as long (up to a cap), a success forgets it. Per worker process, bounded (LRU)."""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("gpuproxy.admin")

# Free attempts before the first lockout: a person mistyping a token is never locked out.
FREE_FAILURES = 5
FIRST_LOCKOUT_SECONDS = 1.0
MAX_LOCKOUT_SECONDS = 300.0
# Failures are forgotten after this long without one (counted from the end of a lockout, so
# waiting out a lockout does not buy a fresh set of free attempts).
FORGET_SECONDS = 600.0
# Tracked IPs per worker; the least recently failing one is dropped first.
MAX_TRACKED_IPS = 10_000


@dataclass(slots=True)
class _Failures:
    count: int = 0
    last: float = 0.0
    locked_until: float = 0.0


class AdminAuthGuard:
    """What `check` says before an admin token is compared; `failed` / `succeeded` after."""

    def __init__(self, *, free_failures: int = FREE_FAILURES,
                 first_lockout: float = FIRST_LOCKOUT_SECONDS,
                 max_lockout: float = MAX_LOCKOUT_SECONDS,
                 forget_after: float = FORGET_SECONDS, max_ips: int = MAX_TRACKED_IPS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.free_failures = free_failures
        self.first_lockout = first_lockout
        self.max_lockout = max_lockout
        self.forget_after = forget_after
        self.max_ips = max_ips
        self._clock = clock
        self._ips: OrderedDict[str, _Failures] = OrderedDict()

    def __len__(self) -> int:
        return len(self._ips)

    def retry_after(self, ip: str) -> int | None:
        """Whole seconds until `ip` may try again, None when it may try now."""
        entry = self._ips.get(ip)
        if entry is None:
            return None
        now = self._clock()
        if entry.locked_until > now:
            return max(1, math.ceil(entry.locked_until - now))
        if now - max(entry.last, entry.locked_until) > self.forget_after:
            del self._ips[ip]
        return None

    def failed(self, ip: str, reason: str) -> float:
        """Count a failure; returns the lockout it starts (0 while attempts are still free)."""
        now = self._clock()
        entry = self._ips.pop(ip, None)
        if entry is None or now - max(entry.last, entry.locked_until) > self.forget_after:
            entry = _Failures()
        entry.count += 1
        entry.last = now
        self._ips[ip] = entry  # most recent last: eviction takes the front
        while len(self._ips) > self.max_ips:
            self._ips.popitem(last=False)
        over = entry.count - self.free_failures
        lockout = 0.0
        if over >= 0:
            lockout = min(self.first_lockout * 2 ** min(over, 64), self.max_lockout)
            entry.locked_until = now + lockout
        # Never the token: only who failed, why and what follows.
        log.warning("admin API: authentication failed (%s) from %s, failure %d; %s", reason, ip,
                    entry.count, f"locked out for {lockout:g}s" if lockout else "not locked out")
        return lockout

    def succeeded(self, ip: str) -> None:
        self._ips.pop(ip, None)
