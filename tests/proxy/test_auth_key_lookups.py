"""KeyLookups on a clock the test controls, with a fake query: maximum age, eviction during a
pending query, expiry after a missed-revocation gap, and stale answers under overload."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from gpuproxy_proxy.auth.apikeys import ApiKey
from gpuproxy_proxy.auth.keylookup import (
    DatabaseUnavailable,
    KeyLookups,
    LookupBusy,
    LookupLimits,
)

RECORD = ApiKey("id-1", "gpx_abcdefgh", "alice", "", datetime(2026, 1, 1, tzinfo=UTC), None)


class Db:
    """Answers RECORD for b"known" (after `gate` opens, when set), or fails while `down`."""

    def __init__(self) -> None:
        self.queries = 0
        self.down = False
        self.gate: asyncio.Event | None = None

    async def fetch(self, digest: bytes) -> ApiKey | None:
        self.queries += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise DatabaseUnavailable("down")
        return RECORD if digest == b"known" else None


def lookups(db: Db, now: list[float], **limits: float) -> tuple[KeyLookups, list[str]]:
    seen: list[str] = []
    return KeyLookups(db.fetch, LookupLimits(**limits),  # type: ignore[arg-type]
                      query_slots=2, max_cached=100, max_negative_cached=100,
                      usable=lambda: True, clock=lambda: now[0], count=seen.append), seen


async def test_ttl_is_capped_by_the_max_age_and_stale_answers_stop_there() -> None:
    db, now = Db(), [1000.0]
    keys, seen = lookups(db, now, ttl_seconds=600, max_age_seconds=10)
    assert await keys.lookup(b"known") is RECORD
    now[0] += 9
    assert await keys.lookup(b"known") is RECORD
    assert db.queries == 1
    now[0] += 2  # past the maximum age although within the TTL: asked again
    db.down = True
    with pytest.raises(DatabaseUnavailable, match="older than 10 s"):
        await keys.lookup(b"known")
    assert db.queries == 2
    assert seen[-2:] == ["error", "too_old"]


async def test_outage_serves_an_entry_younger_than_the_max_age() -> None:
    db, now = Db(), [1000.0]
    keys, seen = lookups(db, now, ttl_seconds=1, max_age_seconds=60)
    assert await keys.lookup(b"known") is RECORD
    db.down = True
    now[0] += 30
    assert await keys.lookup(b"known") is RECORD
    assert seen[-1] == "stale"
    now[0] += 31
    with pytest.raises(DatabaseUnavailable):
        await keys.lookup(b"known")


async def test_an_answer_that_may_predate_a_revocation_is_not_kept() -> None:
    db, now = Db(), [1000.0]
    keys, _ = lookups(db, now, ttl_seconds=600)
    db.gate = asyncio.Event()
    pending = asyncio.create_task(keys.lookup(b"known"))
    while not db.queries:
        await asyncio.sleep(0)
    keys.evict(b"known")  # the revocation arrives while the query runs
    db.gate.set()
    assert await pending is RECORD
    assert await keys.lookup(b"known") is RECORD
    assert db.queries == 2  # asked again, not served from the cache


async def test_after_a_gap_every_cached_key_is_checked_again() -> None:
    db, now = Db(), [1000.0]
    keys, _ = lookups(db, now, ttl_seconds=600)
    await keys.lookup(b"known")
    await keys.lookup(b"unknown")
    now[0] += 1
    keys.expire_all()
    await keys.lookup(b"known")
    await keys.lookup(b"unknown")
    assert db.queries == 4


async def test_overload_serves_stale_entries_and_refuses_the_rest() -> None:
    db, now = Db(), [1000.0]
    keys, seen = lookups(db, now, ttl_seconds=1, max_pending=1)
    assert await keys.lookup(b"known") is RECORD
    now[0] += 5
    db.gate = asyncio.Event()
    blocker = asyncio.create_task(keys.lookup(b"other"))
    while keys.pending < 1:
        await asyncio.sleep(0)
    assert await keys.lookup(b"known") is RECORD  # cached 5 s ago: better than a 503
    with pytest.raises(LookupBusy):
        await keys.lookup(b"third")
    assert seen.count("overloaded") == 2
    db.gate.set()
    assert await blocker is None
    await keys.close()
