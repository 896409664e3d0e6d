"""Budget definitions: PostgreSQL (the `budgets` table) is the record, Redis holds a copy the
scripts read; when Redis lost them (the `bg:loaded` marker is gone) they are loaded again."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from gpuproxy_proxy.database.pool import Database
from gpuproxy_proxy.limits.reservation import budget_base
from gpuproxy_proxy.limits.token_lua import STATUS_LUA

UNITS = ("tokens", "usd")
PERIODS = ("day", "week", "month")
_DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)
_LOADED = "bg:loaded"
_DB_TIMEOUT_SECONDS = 5.0


class BudgetDatabaseUnavailable(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Budget:
    scope: str
    ident: str
    limit: int  # tokens, or micro-USD
    unit: str
    period: str


def to_stored(limit: float, unit: str) -> int:
    """USD are kept as integer micro-USD, so the scripts add integers exactly."""
    return round(limit * 1_000_000) if unit == "usd" else int(limit)


def from_stored(amount: int, unit: str) -> float | int:
    return amount / 1_000_000 if unit == "usd" else amount


class BudgetStore:
    def __init__(self, db: Database | None) -> None:
        self._db = db

    def _pool(self) -> asyncpg.Pool | None:
        if self._db is None:
            return None
        if self._db.pool is None:
            raise BudgetDatabaseUnavailable("the budget database is not connected")
        return self._db.pool

    async def put(self, client: aioredis.Redis, budget: Budget) -> None:
        """The database first (the record), then Redis (what requests are checked against)."""
        pool = self._pool()
        if pool is not None:
            try:
                await pool.execute(
                    "INSERT INTO budgets (scope, scope_id, amount, unit, period) "
                    "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (scope, scope_id) DO UPDATE SET "
                    "amount = $3, unit = $4, period = $5, updated_at = now()",
                    budget.scope, budget.ident, budget.limit, budget.unit, budget.period,
                    timeout=_DB_TIMEOUT_SECONDS)
            except _DB_ERRORS as exc:
                raise BudgetDatabaseUnavailable(str(exc) or type(exc).__name__) from exc
        if not await client.exists(_LOADED):
            await self.load_into_redis(client)
        await client.hset(budget_base(budget.scope, budget.ident), mapping={
            "limit": budget.limit, "unit": budget.unit, "period": budget.period})

    async def delete(self, client: aioredis.Redis, scope: str, ident: str) -> bool:
        pool = self._pool()
        found = True
        if pool is not None:
            try:
                status = await pool.execute(
                    "DELETE FROM budgets WHERE scope = $1 AND scope_id = $2", scope, ident,
                    timeout=_DB_TIMEOUT_SECONDS)
            except _DB_ERRORS as exc:
                raise BudgetDatabaseUnavailable(str(exc) or type(exc).__name__) from exc
            found = status.endswith(" 1")
        removed = await client.delete(budget_base(scope, ident))
        return found and (pool is not None or removed > 0)

    async def load_into_redis(self, client: aioredis.Redis) -> int:
        """Every stored budget into Redis, then the marker (a concurrent load writes the
        same values)."""
        pool = self._pool()
        rows: list[Any] = []
        if pool is not None:
            try:
                rows = await pool.fetch("SELECT scope, scope_id, amount, unit, period "
                                        "FROM budgets", timeout=_DB_TIMEOUT_SECONDS)
            except _DB_ERRORS as exc:
                raise BudgetDatabaseUnavailable(str(exc) or type(exc).__name__) from exc
        pipe = client.pipeline(transaction=False)
        for row in rows:
            pipe.hset(budget_base(row["scope"], row["scope_id"]), mapping={
                "limit": row["amount"], "unit": row["unit"], "period": row["period"]})
        pipe.set(_LOADED, str(int(time.time())))
        await pipe.execute()
        return len(rows)

    async def status(self, client: aioredis.Redis, scope: str,
                     ident: str) -> dict[str, Any] | None:
        """The admin API's view of one budget in its current period, or None."""
        if not await client.exists(_LOADED):
            await self.load_into_redis(client)
        raw = await client.eval(STATUS_LUA, 1, budget_base(scope, ident))
        if not raw:
            return None
        limit, unit, period = int(raw[0]), raw[1].decode(), raw[2].decode()
        spent, reserved, resets_in, resets_at = (int(raw[4]), int(raw[5]), int(raw[6]),
                                                 int(raw[7]))
        return {
            "scope": scope, "id": ident, "unit": unit, "period": period,
            "limit": from_stored(limit, unit),
            "spent": from_stored(spent, unit),
            "reserved": from_stored(reserved, unit),
            "remaining": from_stored(max(0, limit - spent - reserved), unit),
            "resets_in_seconds": resets_in,
            "resets_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(resets_at)),
        }
