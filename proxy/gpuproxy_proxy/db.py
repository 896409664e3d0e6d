"""The PostgreSQL pool (through PgBouncer): connect in the background, migrate, report readiness.

asyncpg runs with `statement_cache_size=0` so no named prepared statement outlives a transaction,
which PgBouncer's transaction pooling requires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import asyncpg
from aiohttp import web

from gpuproxy_proxy.appkeys import CONFIG, METRICS, SECRETS
from gpuproxy_proxy.config import DatabaseConfig, Secrets
from gpuproxy_proxy.metrics import ProxyMetrics
from gpuproxy_proxy.migrations import apply_migrations

log = logging.getLogger(__name__)

_CONNECT_TIMEOUT_SECONDS = 5.0
_START_WAIT_SECONDS = 3.0
_COMMAND_TIMEOUT_SECONDS = 10.0
_RETRY_MIN_SECONDS = 0.5
_RETRY_MAX_SECONDS = 10.0
_GAUGE_INTERVAL_SECONDS = 1.0
_PING_TIMEOUT_SECONDS = 1.0
_PING_CACHE_SECONDS = 1.0


class Database:
    """Owns the asyncpg pool; `pool` is None until the first successful connect + migration."""

    def __init__(
        self, config: DatabaseConfig, secrets: Secrets, metrics: ProxyMetrics | None = None
    ) -> None:
        self.config = config
        self._secrets = secrets
        self._metrics = metrics
        self.pool: asyncpg.Pool | None = None
        self._ready_event = asyncio.Event()
        self._last_ping = 0.0
        self._last_ping_ok = False

    async def connect_once(self) -> None:
        """Create the pool and apply migrations; raises on failure (the caller retries)."""
        c = self.config
        pool = await asyncpg.create_pool(
            host=c.host,
            port=c.port,
            database=c.database,
            user=self._secrets.db_user,
            password=self._secrets.db_password,
            ssl=c.sslmode,
            min_size=c.pool_min_size,
            max_size=c.pool_max_size,
            statement_cache_size=0,
            timeout=_CONNECT_TIMEOUT_SECONDS,
            command_timeout=_COMMAND_TIMEOUT_SECONDS,
            # PgBouncer closes idle server links itself; recycle client links well before.
            max_inactive_connection_lifetime=60.0,
        )
        try:
            async with pool.acquire() as conn:
                await apply_migrations(conn)
        except BaseException:
            await pool.close()
            raise
        self.pool = pool
        self._last_ping, self._last_ping_ok = time.monotonic(), True
        self._ready_event.set()
        if self._metrics is not None:
            self._metrics.db_connections_max.set(c.pool_max_size)

    async def connect_forever(self) -> None:
        """Retry with capped exponential backoff until connected (the start must not crash)."""
        delay = _RETRY_MIN_SECONDS
        last_error = ""
        while self.pool is None:
            try:
                await self.connect_once()
            except Exception as exc:  # any failure means "retry later"
                # Logged when the reason changes, not on every retry.
                error = f"{type(exc).__name__}: {exc}"
                if error != last_error:
                    log.warning(
                        "database %s:%s/%s not usable (%s); check config.database and the "
                        "GPUPROXY_DB_USER/GPUPROXY_DB_PASSWORD secret; retrying in the background",
                        self.config.host, self.config.port, self.config.database, error,
                    )
                    last_error = error
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_SECONDS)
        log.info("database connected and migrated")

    async def wait_connected(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._ready_event.wait()
        return self.pool is not None

    async def ready(self) -> bool:
        """True when the pool exists and a `SELECT 1` succeeds (cached briefly for probes)."""
        pool = self.pool
        if pool is None:
            return False
        now = time.monotonic()
        if now - self._last_ping < _PING_CACHE_SECONDS:
            return self._last_ping_ok
        try:
            async with asyncio.timeout(_PING_TIMEOUT_SECONDS):
                await pool.fetchval("SELECT 1")
            ok = True
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            ok = False
        self._last_ping, self._last_ping_ok = time.monotonic(), ok
        return ok

    def update_gauges(self) -> None:
        if self._metrics is None:
            return
        self._metrics.db_connections_max.set(self.config.pool_max_size)
        pool = self.pool
        active = 0 if pool is None else pool.get_size() - pool.get_idle_size()
        self._metrics.db_connections_active.set(active)

    async def close(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            try:
                async with asyncio.timeout(_CONNECT_TIMEOUT_SECONDS):
                    await pool.close()
            except TimeoutError:
                pool.terminate()
        self.update_gauges()


DB_POOL: web.AppKey[Database | None] = web.AppKey("db_pool")


async def _gauge_loop(db: Database) -> None:
    while True:
        db.update_gauges()
        await asyncio.sleep(_GAUGE_INTERVAL_SECONDS)


async def db_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: `app[DB_POOL]` is a Database (connecting in the background) or None."""
    config = app[CONFIG].database
    if config is None:
        app[DB_POOL] = None
        yield
        return
    db = Database(config, app[SECRETS], app[METRICS])
    app[DB_POOL] = db
    connector = asyncio.create_task(db.connect_forever(), name="db-connect")
    gauges = asyncio.create_task(_gauge_loop(db), name="db-gauges")
    # Give a healthy database a moment so the first requests find the pool ready.
    await db.wait_connected(_START_WAIT_SECONDS)
    try:
        yield
    finally:
        for task in (connector, gauges):
            task.cancel()
        for task in (connector, gauges):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await db.close()


async def database_ready(app: web.Application) -> bool:
    """Readiness: True when no database is configured, else the database answers."""
    db = app[DB_POOL]
    return True if db is None else await db.ready()
