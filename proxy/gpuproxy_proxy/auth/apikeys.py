"""API keys: generation, hashed storage in PostgreSQL; lookups go through keylookup.py's cache.

Keys are 256-bit random tokens, so a single SHA-256 is a sufficient (and fast) one-way hash;
only the hash and a short display prefix are stored.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from gpuproxy_proxy.auth.keylookup import (
    OUTCOMES,
    Admit,
    DatabaseUnavailable,
    KeyLookups,
    LookupBusy,
    LookupLimits,
)
from gpuproxy_proxy.config import AuthConfig
from gpuproxy_proxy.database.pool import Database
from gpuproxy_proxy.observability.metrics import ProxyMetrics

__all__ = [
    "KEY_PREFIX", "ApiKey", "ApiKeyStore", "DatabaseUnavailable", "LookupBusy", "generate_key",
    "hash_key", "looks_like_api_key", "lookup_limits", "well_formed",
]

KEY_PREFIX = "gpx_"
_DISPLAY_PREFIX_LEN = len(KEY_PREFIX) + 8


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    prefix: str
    user_id: str
    name: str
    created_at: datetime
    revoked_at: datetime | None
    # Token limits and budgets per team count this key's requests under it (None: no team).
    team: str | None = None

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
            "team": self.team,
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
        team=row["team"],
    )


_COLUMNS = "id, prefix, user_id, name, created_at, revoked_at, team"
_DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


RevocationListener = Callable[["ApiKey", bytes], Awaitable[None]]


def lookup_limits(config: AuthConfig) -> LookupLimits:
    return LookupLimits(
        ttl_seconds=config.api_key_cache_seconds,
        max_age_seconds=config.api_key_cache_max_stale_seconds,
        timeout_seconds=config.api_key_lookup_timeout_seconds,
        max_pending=config.api_key_max_pending_lookups,
    )


class ApiKeyStore:
    """Create/list/revoke keys and look them up by hash, cached (see KeyLookups).

    A revocation evicts the key here at once and tells `revocation_listeners` (the Redis
    feed, revocations.py), which evict it in every other process."""

    def __init__(
        self,
        db: Database | None,
        cache_seconds: float,
        max_cached: int = 100_000,
        max_negative_cached: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        *,
        limits: LookupLimits | None = None,
        metrics: ProxyMetrics | None = None,
    ) -> None:
        self._db = db
        counters = None if metrics is None else {
            outcome: metrics.api_key_lookups.labels(outcome) for outcome in OUTCOMES
        }
        self._lookups = KeyLookups(
            self._query,
            limits or LookupLimits(ttl_seconds=cache_seconds),
            query_slots=1 if db is None else max(1, db.config.pool_max_size // 2),
            max_cached=max_cached,
            max_negative_cached=max_negative_cached,
            usable=self._usable,
            clock=clock,
            count=None if counters is None else lambda outcome: counters[outcome].inc(),
        )
        self.revocation_listeners: list[RevocationListener] = []

    def _pool(self) -> asyncpg.Pool:
        pool = None if self._db is None else self._db.pool
        if pool is None:
            raise DatabaseUnavailable("the API key database is not connected")
        return pool

    def _usable(self) -> bool:
        db = self._db
        return db is None or db.pool is None or db.up

    async def create(self, user_id: str, name: str = "",
                     team: str | None = None) -> tuple[ApiKey, str]:
        """Returns the stored key and its plaintext, which is never retrievable again."""
        plaintext = generate_key()
        try:
            row = await self._pool().fetchrow(
                f"INSERT INTO api_keys (id, key_hash, prefix, user_id, name, team)"  # noqa: S608
                f" VALUES ($1, $2, $3, $4, $5, $6) RETURNING {_COLUMNS}",
                uuid.uuid4(),
                hash_key(plaintext),
                plaintext[:_DISPLAY_PREFIX_LEN],
                user_id,
                name,
                team,
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
        """Revoke (idempotent); None when no such key. This process forgets the key at once,
        the others when the listeners' message reaches them (else after the cache TTL)."""
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
        digest = bytes(row["key_hash"])
        record = _row_to_key(row)
        self.evict(digest)
        for listener in self.revocation_listeners:
            await listener(record, digest)  # each bounds its own time and handles its errors
        return record

    async def lookup(self, key: str, admit: Admit | None = None) -> ApiKey | None:
        """The key's record (possibly revoked) or None when unknown; see KeyLookups.lookup.

        Raises DatabaseUnavailable when the database cannot answer in time and no entry
        younger than the maximum age is cached, LookupBusy when too many checks wait."""
        return await self._lookups.lookup(hash_key(key), admit)

    async def _query(self, digest: bytes) -> ApiKey | None:
        try:
            row = await self._pool().fetchrow(
                f"SELECT {_COLUMNS} FROM api_keys WHERE key_hash = $1",  # noqa: S608
                digest,
            )
        except _DB_ERRORS as exc:
            # Also asyncpg's own command timeout: only the lookup deadline is a TimeoutError.
            raise DatabaseUnavailable(str(exc) or type(exc).__name__) from exc
        return None if row is None else _row_to_key(row)

    def evict(self, digest: bytes) -> None:
        """A revocation (this process's or one pushed from another)."""
        self._lookups.evict(digest)

    def expire_cached(self) -> None:
        """Revocations may have been missed: check every cached key again before its use."""
        self._lookups.expire_all()

    @property
    def pending_lookups(self) -> int:
        return self._lookups.pending

    def configure(self, config: AuthConfig) -> None:
        """A config reload: applies to lookups from now on."""
        self._lookups.limits = lookup_limits(config)

    def clear_cache(self) -> None:
        self._lookups.clear()

    async def close(self) -> None:
        await self._lookups.close()
