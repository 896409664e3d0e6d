"""The PostgreSQL pool (through PgBouncer, so `statement_cache_size=0`): connect in the
background, migrate, watch health, and switch to rotated credentials without a gap (the new
pool replaces the old one only once it has logged in)."""

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
from gpuproxy_proxy.database.migrations import apply_migrations
from gpuproxy_proxy.observability.metrics import ProxyMetrics

log = logging.getLogger(__name__)

_CONNECT_TIMEOUT_SECONDS = 5.0
_START_WAIT_SECONDS = 3.0
_COMMAND_TIMEOUT_SECONDS = 10.0
_RETRY_MIN_SECONDS = 0.5
_RETRY_MAX_SECONDS = 10.0
_GAUGE_INTERVAL_SECONDS = 1.0
_PING_TIMEOUT_SECONDS = 2.0
_PING_CACHE_SECONDS = 1.0
_WATCH_INTERVAL_SECONDS = 1.0
# A replaced pool is closed this much later: requests that just took a reference to it finish
# their query instead of meeting a closing pool.
_RETIRE_DELAY_SECONDS = 2.0
_SWITCH_RETRY_MAX_SECONDS = 10.0

Credentials = tuple[str | None, str | None]  # (user, password)


def is_auth_failure(exc: BaseException) -> bool:
    """Refused credentials. PostgreSQL says 28xxx; PgBouncer before 1.21 answers a wrong SCRAM
    password with a protocol violation (08P01 "SASL authentication failed")."""
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
        return True
    return isinstance(exc, asyncpg.ProtocolViolationError) and "authentication" in str(exc)


class Database:
    """Owns the asyncpg pool; `pool` is None until the first successful connect + migration.

    `up` is the result of the last health check (a `SELECT 1` every second): an outage shows
    in metrics and degrades API-key lookups, it never makes the pod unready.
    """

    def __init__(
        self, config: DatabaseConfig, secrets: Secrets, metrics: ProxyMetrics | None = None
    ) -> None:
        self.config = config
        self._metrics = metrics
        self.pool: asyncpg.Pool | None = None
        self.up = False
        self._preferred: Credentials = (secrets.db_user, secrets.db_password)
        self._previous: Credentials | None = None
        self._active: Credentials | None = None  # what `pool` logged in with
        self._switch = asyncio.Event()
        self._retiring: set[asyncio.Task[None]] = set()
        self._ready_event = asyncio.Event()
        self._last_ping = 0.0
        self._last_ping_ok = False

    @property
    def credentials_current(self) -> bool:
        """True when the pool uses the newest credentials (False during a rotation)."""
        return self._active == self._preferred

    def _candidates(self) -> list[Credentials]:
        """The newest credentials first, then the ones that worked before them."""
        if self._previous is None or self._previous == self._preferred:
            return [self._preferred]
        return [self._preferred, self._previous]

    async def _open(self, credentials: Credentials) -> asyncpg.Pool:
        """A pool that has logged in with `credentials`; raises otherwise."""
        c = self.config
        pool = await asyncpg.create_pool(
            host=c.host,
            port=c.port,
            database=c.database,
            user=credentials[0],
            password=credentials[1],
            ssl=c.sslmode,
            min_size=c.pool_min_size,
            max_size=c.pool_max_size,
            # No named prepared statement may outlive a transaction (transaction pooling).
            statement_cache_size=0,
            timeout=_CONNECT_TIMEOUT_SECONDS,
            command_timeout=_COMMAND_TIMEOUT_SECONDS,
            # PgBouncer closes idle server links itself; recycle client links well before.
            max_inactive_connection_lifetime=60.0,
        )
        try:
            async with asyncio.timeout(_CONNECT_TIMEOUT_SECONDS):
                await pool.fetchval("SELECT 1")  # with min_size 0 nothing has logged in yet
        except BaseException:
            pool.terminate()
            raise
        return pool

    async def connect_once(self) -> None:
        """Create the pool and apply migrations; raises on failure (the caller retries).

        Refused credentials fall back to the previous ones: during a rotation PgBouncer may
        not have the new password yet."""
        failure: BaseException | None = None
        for credentials in self._candidates():
            try:
                pool = await self._open(credentials)
            except Exception as exc:
                if not is_auth_failure(exc):
                    raise
                failure = exc
                continue
            break
        else:
            assert failure is not None
            raise failure
        try:
            async with pool.acquire() as conn:
                await apply_migrations(conn)
        except BaseException:
            await pool.close()
            raise
        self._install(pool, credentials)
        self._ready_event.set()
        if self._metrics is not None:
            self._metrics.db_connections_max.set(self.config.pool_max_size)

    def _install(self, pool: asyncpg.Pool, credentials: Credentials) -> None:
        old, self.pool, self._active = self.pool, pool, credentials
        self._last_ping, self._last_ping_ok, self.up = time.monotonic(), True, True
        if old is not None:
            task = asyncio.create_task(self._retire(old), name="db-retire-pool")
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def _retire(self, pool: asyncpg.Pool) -> None:
        await asyncio.sleep(_RETIRE_DELAY_SECONDS)
        await _close_pool(pool)

    def set_credentials(self, user: str | None, password: str | None) -> None:
        """New credentials (a rotated secret): used for the next pool, which replaces the
        current one once it has logged in (see `switch_forever`)."""
        new = (user, password)
        if new == self._preferred:
            return
        self._previous = self._active or self._preferred
        self._preferred = new
        self._switch.set()

    async def switch_forever(self) -> None:
        """Background task: while the pool runs on older credentials, try the newest ones
        (at once after a change, then with backoff until PgBouncer accepts them)."""
        while True:
            await self._switch.wait()
            self._switch.clear()
            delay = _RETRY_MIN_SECONDS
            logged = False
            while self.pool is not None and not self.credentials_current:
                wanted = self._preferred
                try:
                    pool = await self._open(wanted)
                except Exception as exc:  # refused or unreachable: keep the working pool
                    if not logged:
                        log.warning(
                            "database: the new credentials are not accepted yet (%s: %s); "
                            "still using the previous ones, retrying", type(exc).__name__, exc)
                        logged = True
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await self._switch.wait()
                    self._switch.clear()
                    delay = min(delay * 2, _SWITCH_RETRY_MAX_SECONDS)
                    continue
                if wanted != self._preferred:  # rotated again meanwhile: try the newest
                    await _close_pool(pool)
                    continue
                self._install(pool, wanted)
                log.warning("database: switched to the new credentials")

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

    async def watch_forever(self) -> None:
        """Background task: keeps `up` current."""
        while True:
            was, self.up = self.up, await self.ready()
            if was != self.up and self.pool is not None:
                log.warning("database %s", "reachable again" if self.up else "unreachable")
            await asyncio.sleep(_WATCH_INTERVAL_SECONDS)

    async def ready(self) -> bool:
        """True when the pool exists and a `SELECT 1` succeeds (cached briefly)."""
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
        pool, self.pool, self.up = self.pool, None, False
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        if pool is not None:
            await _close_pool(pool)
        self.update_gauges()


async def _close_pool(pool: asyncpg.Pool) -> None:
    """Close gracefully (queries in progress finish), or terminate after the timeout."""
    try:
        async with asyncio.timeout(_CONNECT_TIMEOUT_SECONDS):
            await pool.close()
    except TimeoutError:
        pool.terminate()


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
    tasks = [
        asyncio.create_task(db.connect_forever(), name="db-connect"),
        asyncio.create_task(_gauge_loop(db), name="db-gauges"),
        asyncio.create_task(db.watch_forever(), name="db-watch"),
        asyncio.create_task(db.switch_forever(), name="db-credentials"),
    ]
    # Give a healthy database a moment so the first requests find the pool ready.
    await db.wait_connected(_START_WAIT_SECONDS)
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await db.close()


async def database_ready(app: web.Application) -> bool:
    """True when no database is configured, else the database answers."""
    db = app[DB_POOL]
    return True if db is None else await db.ready()
