"""Retention of usage_records: daily partitions created ahead and dropped past
`metering.retention_days`, by every worker of every pod, safely (see migrations.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime

import asyncpg
from aiohttp import web

from gpuproxy_proxy.appkeys import CONFIG
from gpuproxy_proxy.database.pool import DB_POOL, Database
from gpuproxy_proxy.runtime import RUNTIME

log = logging.getLogger(__name__)

DAYS_AHEAD = 7  # a week of maintenance can fail before an insert finds no partition
_INTERVAL_SECONDS = 3600.0
_RETRY_SECONDS = 30.0
_TIMEOUT_SECONDS = 60.0
# One statement in its own transaction: the function's pg_advisory_xact_lock serializes pods.
_MAINTAIN = "SELECT created, dropped FROM gpuproxy_usage_partitions($1::date, $2, $3)"


async def maintain(db: Database, retention_days: int | None,
                   first_day: date | None = None) -> tuple[int, int]:
    """Create missing partitions from `first_day` (default yesterday) to DAYS_AHEAD ahead,
    drop those past the retention; returns (created, dropped)."""
    pool = db.pool
    if pool is None:
        raise ConnectionError("the usage database is not connected")
    today = datetime.now(UTC).date()
    start = first_day if first_day is not None else date.fromordinal(today.toordinal() - 1)
    row = await pool.fetchrow(_MAINTAIN, start, DAYS_AHEAD, retention_days,
                              timeout=_TIMEOUT_SECONDS)
    created, dropped = (int(row["created"]), int(row["dropped"])) if row else (0, 0)
    if created or dropped:
        log.info("usage partitions maintained: %d created, %d dropped past %s days",
                 created, dropped, retention_days)
    return created, dropped


async def ensure_partitions_for(db: Database, created_unix: float, retention_days: int) -> None:
    """Partitions from the day of `created_unix` (a replay of old records) up to today."""
    await maintain(db, retention_days, datetime.fromtimestamp(created_unix, UTC).date())


async def _loop(app: web.Application, db: Database) -> None:
    next_run = 0.0
    while True:
        now = time.monotonic()
        if now >= next_run and db.pool is not None:
            try:
                await maintain(db, app[RUNTIME].config.metering.retention_days)
                next_run = now + _INTERVAL_SECONDS
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                log.warning("usage partition maintenance failed (%s); retrying", exc)
                next_run = now + _RETRY_SECONDS
        await asyncio.sleep(1.0 if db.pool is None else min(_RETRY_SECONDS, next_run - now))


async def partitions_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx (after db_ctx): the maintenance loop, when metering has a database."""
    db = app[DB_POOL]
    if db is None or not app[CONFIG].metering.enabled:
        yield
        return
    task = asyncio.create_task(_loop(app, db), name="usage-partitions")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
