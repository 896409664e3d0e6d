"""Verified bearer tokens -> their Principal, so a client resending the same JWT skips HMAC,
base64 and JSON decoding. Bounded; an entry never outlives the token's own validity."""

from __future__ import annotations

import time
from collections.abc import Callable

from gpuproxy_proxy.auth.principal import Principal

# Short enough that a changed claims setting or clock jump is noticed soon, long enough that a
# busy client verifies its token about once a minute instead of on every request.
DEFAULT_TTL_SECONDS = 60.0
DEFAULT_MAX_ENTRIES = 10_000


class VerifiedTokens:
    """token -> (wall-clock deadline, Principal). Whoever changes what makes a token valid
    (secret rotation, claims settings, admin token) calls `clear()`."""

    __slots__ = ("_clock", "_entries", "_max", "_ttl")

    def __init__(self, ttl_seconds: float = DEFAULT_TTL_SECONDS,
                 max_entries: int = DEFAULT_MAX_ENTRIES,
                 clock: Callable[[], float] = time.time) -> None:
        self._ttl = ttl_seconds
        self._max = max_entries
        self._clock = clock
        self._entries: dict[str, tuple[float, Principal]] = {}

    def get(self, token: str) -> Principal | None:
        hit = self._entries.get(token)
        if hit is None:
            return None
        if hit[0] > self._clock():
            return hit[1]
        del self._entries[token]
        return None

    def put(self, token: str, valid_until: float, principal: Principal) -> None:
        """Remember until `valid_until` (wall clock) or the TTL, whichever comes first."""
        now = self._clock()
        deadline = min(valid_until, now + self._ttl)
        if deadline <= now:
            return
        entries = self._entries
        if len(entries) >= self._max and token not in entries:
            # Full: expired entries go first; else the oldest half (insertion order), so a
            # flood of distinct tokens costs O(1) amortised and never grows the map.
            live = {k: v for k, v in entries.items() if v[0] > now}
            if len(live) >= self._max:
                live = dict(list(live.items())[len(live) // 2:])
            self._entries = entries = live
        entries[token] = (deadline, principal)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
