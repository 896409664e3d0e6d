"""The shared timer wheels of a process: connections waiting in one state (for a request, for
the rest of a head or body, for a client to read) sit in buckets by the time they started, and
one periodic callback per wheel deals with those past its timeout. No timer per connection."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

# Bucket width: a timeout fires up to this much (plus one tick) late.
_QUANTUM_SECONDS = 0.1
_MAX_TICK_SECONDS = 1.0
_MIN_TICK_SECONDS = 0.05

T = TypeVar("T")


class Waiting(Protocol):
    sweep_key: int | None

    def expire(self) -> None:
        """Close: the keep-alive timeout passed while it waited for a request."""


class _Wheel(Generic[T]):
    """Buckets keyed by the waiting start (so a reload's new timeout applies to everything
    waiting), swept every `tick` seconds while anything waits. Subclasses say where an
    entry's key lives and what expiring means."""

    __slots__ = ("_buckets", "_handle", "_loop", "_timeout")

    def __init__(self, timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._buckets: dict[int, set[T]] = {}
        self._timeout = timeout
        self._handle: asyncio.TimerHandle | None = None

    @property
    def timeout(self) -> float:
        return self._timeout

    def set_timeout(self, timeout: float) -> None:
        """A reload: applies to every waiting entry, from the next tick."""
        self._timeout = timeout
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._schedule()

    def _get_key(self, item: T) -> int | None:
        raise NotImplementedError

    def _set_key(self, item: T, key: int | None) -> None:
        raise NotImplementedError

    def _expire(self, item: T, waited: float) -> bool:
        """`item` waited `waited` seconds (at least the timeout); True keeps it waiting."""
        raise NotImplementedError

    def watch(self, item: T) -> None:
        """`item` starts waiting now (again, if it was already)."""
        if self._get_key(item) is not None:
            self.unwatch(item)  # a stale entry would expire it early
        key = int(self._loop.time() / _QUANTUM_SECONDS)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = set()
        bucket.add(item)
        self._set_key(item, key)
        if self._handle is None:
            self._schedule()

    def unwatch(self, item: T) -> None:
        """`item` stopped waiting (or closed)."""
        key = self._get_key(item)
        if key is None:
            return
        self._set_key(item, None)
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.discard(item)
            if not bucket:
                del self._buckets[key]

    def _schedule(self) -> None:
        if self._buckets:
            tick = min(_MAX_TICK_SECONDS, max(_MIN_TICK_SECONDS, self._timeout / 8))
            self._handle = self._loop.call_later(tick, self._sweep)

    def _sweep(self) -> None:
        self._handle = None
        now = self._loop.time()
        # Bucket k holds starts in [k, k+1) quanta: expired when its end is past the timeout.
        limit = (now - self._timeout) / _QUANTUM_SECONDS - 1
        for key in [k for k in self._buckets if k <= limit]:
            bucket = self._buckets.pop(key)
            waited = now - (key + 1) * _QUANTUM_SECONDS  # never more than it really waited
            kept: set[T] = set()
            for item in bucket:
                self._set_key(item, None)
                if self._expire(item, waited):
                    kept.add(item)
            for item in kept:
                if self._get_key(item) is None:  # not moved to a new start meanwhile
                    self._set_key(item, key)
                    self._buckets.setdefault(key, set()).add(item)
        self._schedule()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._buckets.clear()


class KeepAliveSweep(_Wheel[Waiting]):
    """Connections waiting for a request (the key lives on the connection: every idle one is
    here, so no dict entry each); a connection leaves the moment a request begins."""

    __slots__ = ()

    def _get_key(self, item: Waiting) -> int | None:
        return item.sweep_key

    def _set_key(self, item: Waiting, key: int | None) -> None:
        item.sweep_key = key

    def _expire(self, item: Waiting, waited: float) -> bool:
        item.expire()
        return False


class DeadlineSweep(_Wheel[T]):
    """The few connections in a passing state (a head or body arriving, a client not reading):
    their keys in a dict of the wheel's own, `on_expire(item, waited)` called past the
    timeout, which keeps the item waiting from the same start when it returns True (a minimum
    rate still met) or may `watch` it again (a fresh start)."""

    __slots__ = ("_keys", "_on_expire")

    def __init__(self, timeout: float, on_expire: Callable[[T, float], bool]) -> None:
        super().__init__(timeout)
        self._keys: dict[T, int] = {}
        self._on_expire = on_expire

    def __contains__(self, item: T) -> bool:
        return item in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def _get_key(self, item: T) -> int | None:
        return self._keys.get(item)

    def _set_key(self, item: T, key: int | None) -> None:
        if key is None:
            self._keys.pop(item, None)
        else:
            self._keys[item] = key

    def _expire(self, item: T, waited: float) -> bool:
        return self._on_expire(item, waited)

    def close(self) -> None:
        super().close()
        self._keys.clear()
