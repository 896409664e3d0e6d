"""The one keep-alive sweep of a process: connections waiting for a request sit in buckets by
the time they started waiting, and one periodic callback closes those past the timeout. No
timer per connection; a connection leaves its bucket the moment a request arrives."""

from __future__ import annotations

import asyncio
from typing import Protocol

# Bucket width: a timeout fires up to this much (plus one tick) late.
_QUANTUM_SECONDS = 0.1
_MAX_TICK_SECONDS = 1.0
_MIN_TICK_SECONDS = 0.05


class Waiting(Protocol):
    sweep_key: int | None

    def expire(self) -> None:
        """Close: the keep-alive timeout passed while it waited for a request."""


class KeepAliveSweep:
    """Buckets keyed by the waiting start (so a reload's new timeout applies to every
    waiting connection), swept every `tick` seconds while any connection waits."""

    __slots__ = ("_buckets", "_handle", "_loop", "_timeout")

    def __init__(self, timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._buckets: dict[int, set[Waiting]] = {}
        self._timeout = timeout
        self._handle: asyncio.TimerHandle | None = None

    @property
    def timeout(self) -> float:
        return self._timeout

    def set_timeout(self, timeout: float) -> None:
        """A reload: applies to every waiting connection, from the next tick."""
        self._timeout = timeout
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._schedule()

    def watch(self, conn: Waiting) -> None:
        """`conn` starts waiting now."""
        key = int(self._loop.time() / _QUANTUM_SECONDS)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = set()
        bucket.add(conn)
        conn.sweep_key = key
        if self._handle is None:
            self._schedule()

    def unwatch(self, conn: Waiting) -> None:
        """`conn` got a request, or closed."""
        key = conn.sweep_key
        if key is None:
            return
        conn.sweep_key = None
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.discard(conn)
            if not bucket:
                del self._buckets[key]

    def _schedule(self) -> None:
        if self._buckets:
            tick = min(_MAX_TICK_SECONDS, max(_MIN_TICK_SECONDS, self._timeout / 8))
            self._handle = self._loop.call_later(tick, self._sweep)

    def _sweep(self) -> None:
        self._handle = None
        # Bucket k holds starts in [k, k+1) quanta: expired when its end is past the timeout.
        limit = (self._loop.time() - self._timeout) / _QUANTUM_SECONDS - 1
        for key in [k for k in self._buckets if k <= limit]:
            for conn in self._buckets.pop(key):
                conn.sweep_key = None
                conn.expire()
        self._schedule()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._buckets.clear()
