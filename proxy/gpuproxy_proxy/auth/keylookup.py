"""API-key lookups, bounded: a cache whose entries have a maximum age, one query per key at a
time under a deadline, and a per-worker cap on pending cache misses."""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gpuproxy_proxy.auth.apikeys import ApiKey

# What happened to a check the cache could not answer (gpuproxy_api_key_lookups_total):
# per database query "found", "unknown", "timeout", "error"; per request "coalesced" (joined a
# pending query), "overloaded" (cap reached: 503), "unavailable" (database down, nothing
# cached: 503), "stale" (a cached entry served during an outage), "too_old" (only an entry
# past its maximum age: 503).
OUTCOMES = ("found", "unknown", "timeout", "error", "coalesced", "overloaded", "unavailable",
            "stale", "too_old")


class DatabaseUnavailable(Exception):
    """The key store cannot reach the database (or none is configured)."""


class LookupBusy(DatabaseUnavailable):
    """Too many cache misses are waiting for the database in this worker."""


@dataclass(frozen=True, slots=True)
class LookupLimits:
    ttl_seconds: float = 30.0
    max_age_seconds: float = 300.0
    timeout_seconds: float = 2.0
    max_pending: int = 256


Fetch = Callable[[bytes], Awaitable["ApiKey | None"]]
Admit = Callable[[], Awaitable[None]]


class _Cache:
    """LRU-bounded digest -> (when the database was read, monotonic; the record or None)."""

    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._data: OrderedDict[bytes, tuple[float, ApiKey | None]] = OrderedDict()

    def get(self, key: bytes) -> tuple[float, ApiKey | None] | None:
        return self._data.get(key)

    def put(self, key: bytes, read_at: float, value: ApiKey | None) -> None:
        self._data[key] = (read_at, value)
        self._data.move_to_end(key)
        while len(self._data) > self._max:
            self._data.popitem(last=False)

    def pop(self, key: bytes) -> None:
        self._data.pop(key, None)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


class KeyLookups:
    """The cache and the queries behind it. `fetch` raises DatabaseUnavailable on any database
    error; `usable` says whether the database passed its last health check."""

    def __init__(self, fetch: Fetch, limits: LookupLimits, *, query_slots: int,
                 max_cached: int, max_negative_cached: int,
                 usable: Callable[[], bool], clock: Callable[[], float] = time.monotonic,
                 count: Callable[[str], None] | None = None) -> None:
        self._fetch = fetch
        self.limits = limits
        self._usable = usable
        self._clock = clock
        self._count = count or (lambda outcome: None)
        # Invalid keys have their own (smaller) cache, so a flood of random keys never
        # evicts valid entries.
        self._positive = _Cache(max_cached)
        self._negative = _Cache(max_negative_cached)
        self._pending: dict[bytes, asyncio.Task[ApiKey | None]] = {}
        self._evicted_while_pending: set[bytes] = set()
        # Queries may hold at most this many pool connections at once, so a flood of misses
        # cannot starve metering and the admin API of database connections.
        self._slots = asyncio.Semaphore(query_slots)
        # Entries read before this are checked again before use (revocations may be missed).
        self._valid_after = -math.inf

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def lookup(self, digest: bytes, admit: Admit | None = None) -> ApiKey | None:
        """The record (possibly revoked) or None when unknown; raises DatabaseUnavailable
        (LookupBusy at once when too many misses wait). `admit` runs before a new query and
        may raise to refuse it (the per-IP lookup quota)."""
        limits = self.limits
        now = self._clock()
        fresh_after = max(now - min(limits.ttl_seconds, limits.max_age_seconds),
                          self._valid_after)
        for cache in (self._positive, self._negative):
            hit = cache.get(digest)
            if hit is not None and hit[0] > fresh_after:
                return hit[1]
        task = self._pending.get(digest)
        if task is None:
            if not self._usable():
                # Answer now rather than park the request for a command timeout (PgBouncer
                # queues queries while PostgreSQL is away).
                return self._stale(digest, DatabaseUnavailable(
                    "the API key database failed its last health check"), "unavailable")
            try:
                self._check_capacity()
                if admit is not None:
                    await admit()
                    task = self._pending.get(digest)  # started by another request meanwhile?
                    if task is None:
                        self._check_capacity()
            except LookupBusy as exc:
                # A flood of unknown keys must not refuse the keys cached a while ago.
                return self._stale(digest, exc, "")
            if task is None:
                task = self._start(digest)
            else:
                self._count("coalesced")
        else:
            self._count("coalesced")
        try:
            # Shielded: a client that goes away must not cancel the query others wait for.
            return await asyncio.shield(task)
        except DatabaseUnavailable as exc:
            return self._stale(digest, exc, "")

    def _check_capacity(self) -> None:
        if len(self._pending) >= self.limits.max_pending:
            self._count("overloaded")
            raise LookupBusy(f"{len(self._pending)} API key checks are already waiting for the "
                             "database in this worker")

    def _stale(self, digest: bytes, exc: DatabaseUnavailable, outcome: str) -> ApiKey | None:
        """During an outage a cached entry beats rejecting every client, up to its maximum
        age: past it a revoked key could otherwise be served for as long as the outage."""
        hit = self._positive.get(digest)
        if hit is None:
            if outcome:
                self._count(outcome)
            raise exc
        if self._clock() - hit[0] >= self.limits.max_age_seconds:
            self._count("too_old")
            raise DatabaseUnavailable(
                f"{exc}; the cached entry is older than {self.limits.max_age_seconds:g} s"
            ) from exc
        self._count("stale")
        return hit[1]

    def _start(self, digest: bytes) -> asyncio.Task[ApiKey | None]:
        task = asyncio.get_running_loop().create_task(self._query(digest),
                                                      name="api-key-lookup")
        self._pending[digest] = task
        task.add_done_callback(lambda done: self._finished(digest, done))
        return task

    async def _query(self, digest: bytes) -> ApiKey | None:
        started = self._clock()
        timeout = self.limits.timeout_seconds
        try:
            # The deadline covers the wait for a query slot and a pool connection too, and
            # cancels the query, which gives its connection back.
            async with asyncio.timeout(timeout), self._slots:
                record = await self._fetch(digest)
        except TimeoutError as exc:
            self._count("timeout")
            raise DatabaseUnavailable(
                f"the API key database did not answer within {timeout:g} s") from exc
        except DatabaseUnavailable:
            self._count("error")
            raise
        self._count("unknown" if record is None else "found")
        if digest in self._evicted_while_pending:
            return record  # revoked meanwhile: this answer may predate it, do not keep it
        if record is None:
            self._negative.put(digest, started, None)
        else:
            self._negative.pop(digest)
            self._positive.put(digest, started, record)
        return record

    def _finished(self, digest: bytes, task: asyncio.Task[ApiKey | None]) -> None:
        if self._pending.get(digest) is task:
            del self._pending[digest]
            self._evicted_while_pending.discard(digest)
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have gone

    def evict(self, digest: bytes) -> None:
        """A revocation: the next use asks the database."""
        self._positive.pop(digest)
        self._negative.pop(digest)
        if digest in self._pending:
            self._evicted_while_pending.add(digest)

    def expire_all(self) -> None:
        """Every entry is checked again before its next use (still an outage fallback)."""
        self._valid_after = self._clock()

    def clear(self) -> None:
        self._positive.clear()
        self._negative.clear()

    async def close(self) -> None:
        tasks = list(self._pending.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
