"""API keys: generation, hashed storage in PostgreSQL, and a bounded in-process lookup cache.

Keys are 256-bit random tokens, so a single SHA-256 is a sufficient (and fast) one-way hash;
only the hash and a short display prefix are stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from gpuproxy_proxy.database.pool import Database

KEY_PREFIX = "gpx_"
_DISPLAY_PREFIX_LEN = len(KEY_PREFIX) + 8


class DatabaseUnavailable(Exception):
    """The key store cannot reach the database (or none is configured)."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    prefix: str
    user_id: str
    name: str
    created_at: datetime
    revoked_at: datetime | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def public(self) -> dict[str, Any]:
        """The admin API's view: never the key or its hash."""
        return {
            "id": self.id,
            "prefix": self.prefix,
            "user_id": self.user_id,
            "name": self.name,
            "created_at": self.created_at.isoformat(),
            "revoked_at": None if self.revoked_at is None else self.revoked_at.isoformat(),
        }


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def looks_like_api_key(token: str) -> bool:
    return token.startswith(KEY_PREFIX)


_KEY_SHAPE = re.compile(re.escape(KEY_PREFIX) + r"[A-Za-z0-9_-]{43}")


def well_formed(key: str) -> bool:
    """Exactly the shape generate_key() produces; anything else is rejected without a query."""
    return _KEY_SHAPE.fullmatch(key) is not None


def _row_to_key(row: asyncpg.Record) -> ApiKey:
    return ApiKey(
        id=str(row["id"]),
        prefix=row["prefix"],
        user_id=row["user_id"],
        name=row["name"],
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
    )


_COLUMNS = "id, prefix, user_id, name, created_at, revoked_at"
_DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


class _TtlCache:
    """LRU-bounded map with a per-entry deadline; expired entries stay readable as stale."""

    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._data: OrderedDict[bytes, tuple[float, ApiKey | None]] = OrderedDict()

    def get(self, key: bytes) -> tuple[float, ApiKey | None] | None:
        return self._data.get(key)

    def put(self, key: bytes, deadline: float, value: ApiKey | None) -> None:
        self._data[key] = (deadline, value)
        self._data.move_to_end(key)
        while len(self._data) > self._max:
            self._data.popitem(last=False)

    def pop(self, key: bytes) -> None:
        self._data.pop(key, None)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


class ApiKeyStore:
    """Create/list/revoke keys and look them up by hash with positive and negative caching.

    Invalid keys get their own (smaller) cache so a flood of random keys neither reaches the
    database nor evicts valid entries. Concurrent misses for one key share one query.
    """

    def __init__(
        self,
        db: Database | None,
        cache_seconds: float,
        max_cached: int = 100_000,
        max_negative_cached: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._db = db
        self._ttl = cache_seconds
        self._clock = clock
        self._positive = _TtlCache(max_cached)
        self._negative = _TtlCache(max_negative_cached)
        self._pending: dict[bytes, asyncio.Future[ApiKey | None]] = {}
        # Cache misses may hold at most this many pool connections at once, so a flood of
        # random keys cannot starve metering and the admin API of database connections.
        miss_slots = 1 if db is None else max(1, db.config.pool_max_size // 2)
        self._miss_slots = asyncio.Semaphore(miss_slots)

    def _pool(self) -> asyncpg.Pool:
        pool = None if self._db is None else self._db.pool
        if pool is None:
            raise DatabaseUnavailable("the API key database is not connected")
        return pool

    async def create(self, user_id: str, name: str = "") -> tuple[ApiKey, str]:
        """Returns the stored key and its plaintext, which is never retrievable again."""
        plaintext = generate_key()
        try:
            row = await self._pool().fetchrow(
                f"INSERT INTO api_keys (id, key_hash, prefix, user_id, name)"  # noqa: S608
                f" VALUES ($1, $2, $3, $4, $5) RETURNING {_COLUMNS}",
                uuid.uuid4(),
                hash_key(plaintext),
                plaintext[:_DISPLAY_PREFIX_LEN],
                user_id,
                name,
            )
        except _DB_ERRORS as exc:
            raise DatabaseUnavailable(str(exc)) from exc
        assert row is not None
        return _row_to_key(row), plaintext

    async def list(
        self, user_id: str | None = None, include_revoked: bool = True, limit: int = 1000
    ) -> list[ApiKey]:
        sql = f"SELECT {_COLUMNS} FROM api_keys WHERE ($1::text IS NULL OR user_id = $1)"  # noqa: S608
        if not include_revoked:
            sql += " AND revoked_at IS NULL"
        try:
            rows = await self._pool().fetch(
                sql + " ORDER BY created_at, id LIMIT $2", user_id, limit
            )
        except _DB_ERRORS as exc:
            raise DatabaseUnavailable(str(exc)) from exc
        return [_row_to_key(r) for r in rows]

    async def revoke(self, key_id: str) -> ApiKey | None:
        """Revoke (idempotent); None when no such key. Other processes see it after the TTL."""
        try:
            parsed = uuid.UUID(key_id)
        except ValueError:
            return None
        try:
            row = await self._pool().fetchrow(
                "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())"  # noqa: S608
                f" WHERE id = $1 RETURNING {_COLUMNS}, key_hash",
                parsed,
            )
        except _DB_ERRORS as exc:
            raise DatabaseUnavailable(str(exc)) from exc
        if row is None:
            return None
        self._positive.pop(bytes(row["key_hash"]))  # this process sees it immediately
        return _row_to_key(row)

    async def lookup(self, key: str) -> ApiKey | None:
        """The key's record (possibly revoked) or None when unknown.

        Raises DatabaseUnavailable only when the database is down and nothing, not even a
        stale entry, is cached (a stale hit beats rejecting every client during an outage).
        """
        digest = hash_key(key)
        now = self._clock()
        for cache in (self._positive, self._negative):
            hit = cache.get(digest)
            if hit is not None and hit[0] > now:
                return hit[1]
        pending = self._pending.get(digest)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[ApiKey | None] = asyncio.get_running_loop().create_future()
        self._pending[digest] = future
        try:
            result = await self._fetch(digest)
        except BaseException as exc:
            if not future.done():
                # Waiters must not inherit the leader's cancellation.
                shared = exc if isinstance(exc, Exception) else DatabaseUnavailable("cancelled")
                future.set_exception(shared)
                future.exception()  # mark retrieved: there may be no waiters
            raise
        else:
            future.set_result(result)
            return result
        finally:
            del self._pending[digest]

    async def _fetch(self, digest: bytes) -> ApiKey | None:
        try:
            db = self._db
            if db is not None and db.pool is not None and not db.up:
                # The last health check failed: answer 503 now rather than park the request
                # for a command timeout (PgBouncer queues queries while PostgreSQL is away).
                raise DatabaseUnavailable("the API key database failed its last health check")
            async with self._miss_slots:
                row = await self._query(digest)
        except (DatabaseUnavailable, *_DB_ERRORS) as exc:
            stale = self._positive.get(digest)
            if stale is not None:
                return stale[1]
            raise DatabaseUnavailable(str(exc)) from exc
        deadline = self._clock() + self._ttl
        if row is None:
            self._negative.put(digest, deadline, None)
            return None
        record = _row_to_key(row)
        self._negative.pop(digest)
        self._positive.put(digest, deadline, record)
        return record

    async def _query(self, digest: bytes) -> asyncpg.Record | None:
        return await self._pool().fetchrow(
            f"SELECT {_COLUMNS} FROM api_keys WHERE key_hash = $1",  # noqa: S608
            digest,
        )

    def set_cache_seconds(self, seconds: float) -> None:
        """A config reload: applies to entries cached from now on."""
        self._ttl = seconds

    def clear_cache(self) -> None:
        self._positive.clear()
        self._negative.clear()
