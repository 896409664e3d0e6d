"""Usage metering: one record per request, buffered in memory (bounded) and written to
PostgreSQL in batches by a background task; kept and retried through database outages,
flushed on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg
from aiohttp import web

from gpuproxy_proxy.appkeys import CONFIG, METRICS
from gpuproxy_proxy.config import MeteringConfig
from gpuproxy_proxy.database.pool import DB_POOL, Database
from gpuproxy_proxy.observability.metrics import ProxyMetrics

log = logging.getLogger(__name__)

_BACKOFF_MIN_SECONDS = 0.5
_BACKOFF_MAX_SECONDS = 10.0
_SHUTDOWN_FLUSH_SECONDS = 10.0
_WRITE_TIMEOUT_SECONDS = 10.0
_DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


def is_bad_data(exc: BaseException) -> bool:
    """Errors caused by a record's content (retrying cannot help), as opposed to outages.

    SQLSTATE class 22 is "data exception" (e.g. a NUL byte in text, a number out of range);
    asyncpg.DataError is raised client-side when a value cannot be encoded.
    """
    if isinstance(exc, asyncpg.DataError):
        return True
    return isinstance(exc, asyncpg.PostgresError) and str(exc.sqlstate or "").startswith("22")


@dataclass(slots=True)
class UsageRecord:
    request_id: str
    principal_kind: str
    user_id: str | None
    api_key_id: str | None
    backend: str | None
    route: str
    status: int
    bytes_in: int = 0
    bytes_out: int = 0
    duration_ms: float = 0.0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    # The token counts are metering/estimate.py's: the backend reported no usage.
    estimated: bool = False
    # Wall-clock seconds: time.time() is a fraction of datetime.now()'s cost on the request
    # path; the datetime is made when the batch is written.
    created_unix: float = field(default_factory=time.time)
    # Assigned at the first write attempt and kept across retries, so a batch whose commit
    # acknowledgement was lost is not counted twice (ON CONFLICT DO NOTHING).
    record_id: uuid.UUID | None = None


# One statement, one round trip, no COPY and no named prepared statement: works through
# PgBouncer in transaction mode.
_INSERT = """
INSERT INTO usage_records (
    id, request_id, principal_kind, user_id, api_key_id, backend, route, status, bytes_in,
    bytes_out, duration_ms, prompt_tokens, completion_tokens, total_tokens, created_at,
    estimated)
SELECT * FROM unnest(
    $1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
    $8::int[], $9::bigint[], $10::bigint[], $11::float8[], $12::int[], $13::int[], $14::int[],
    $15::timestamptz[], $16::bool[])
ON CONFLICT (id) DO NOTHING
"""


def _columns(batch: list[UsageRecord]) -> list[list[object]]:
    for rec in batch:
        if rec.record_id is None:
            rec.record_id = uuid.uuid4()
    return [
        [r.record_id for r in batch],
        [r.request_id for r in batch],
        [r.principal_kind for r in batch],
        [r.user_id for r in batch],
        [r.api_key_id for r in batch],
        [r.backend for r in batch],
        [r.route for r in batch],
        [r.status for r in batch],
        [r.bytes_in for r in batch],
        [r.bytes_out for r in batch],
        [r.duration_ms for r in batch],
        [r.prompt_tokens for r in batch],
        [r.completion_tokens for r in batch],
        [r.total_tokens for r in batch],
        [datetime.fromtimestamp(r.created_unix, UTC) for r in batch],
        [r.estimated for r in batch],
    ]


class UsageMeter:
    def __init__(
        self, config: MeteringConfig, db: Database | None, metrics: ProxyMetrics | None = None
    ) -> None:
        self.config = config
        self._db = db
        self._metrics = metrics
        self._enabled = config.enabled and db is not None
        self._buffer: deque[UsageRecord] = deque()
        self._in_flight = 0  # records taken out of the buffer by a running write
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0
        self.written = 0

    @property
    def buffered(self) -> int:
        return len(self._buffer) + self._in_flight

    def record(self, rec: UsageRecord) -> None:
        """Queue one record; never blocks or raises on the request path."""
        if not self._enabled:
            return
        buf = self._buffer
        if len(buf) + self._in_flight >= self.config.max_buffered_records:
            if buf:
                buf.popleft()  # the oldest record goes first
                self._drop(1)
            else:
                self._drop(1)
                return
        buf.append(rec)
        if len(buf) >= self.config.batch_size:
            self._wake.set()

    def _drop(self, count: int) -> None:
        self.dropped += count
        if self._metrics is not None:
            self._metrics.usage_records_dropped.inc(count)

    def _gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.usage_records_buffered.set(self.buffered)

    def reconfigure(self, config: MeteringConfig) -> None:
        """A config reload: batch size, interval and bound apply from the next batch; turning
        metering off stops recording, and what is buffered is still written."""
        self.config = config
        self._enabled = config.enabled and self._db is not None
        self.start()
        self._wake.set()

    def start(self) -> None:
        if self._enabled and self._task is None:
            self._task = asyncio.create_task(self._run(), name="usage-meter")

    async def _run(self) -> None:
        backoff = _BACKOFF_MIN_SECONDS
        failing = False
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.flush_interval_seconds):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
            except Exception as exc:  # the writer must outlive any single failure
                if not isinstance(exc, _DB_ERRORS):
                    log.exception("unexpected error writing usage records; retrying")
                elif not failing:  # once per outage, not once per retry
                    log.warning(
                        "usage records cannot be written (%s: %s); keeping up to %d in memory "
                        "and retrying with backoff", type(exc).__name__, exc,
                        self.config.max_buffered_records,
                    )
                failing = True
                self._gauge()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX_SECONDS)
            else:
                if failing:
                    log.warning("usage records are written again (%d dropped so far)",
                                self.dropped)
                failing = False
                backoff = _BACKOFF_MIN_SECONDS
            self._gauge()

    async def flush(self) -> int:
        """Write everything buffered, batch by batch; raises on a database error (the failed
        batch goes back to the front of the buffer)."""
        total = 0
        while self._buffer:
            size = min(len(self._buffer), self.config.batch_size)
            batch = [self._buffer.popleft() for _ in range(size)]
            self._in_flight = len(batch)
            try:
                written = await self._write_batch(batch)
            except BaseException:
                self._requeue(batch)
                raise
            finally:
                self._in_flight = 0
            total += written
            self.written += written
            if self._metrics is not None:
                self._metrics.usage_records_written.inc(written)
        return total

    async def _write_batch(self, batch: list[UsageRecord]) -> int:
        """Write a batch; if its content is rejected, write record by record and drop (and
        count) only the offending ones, so one bad record cannot block the queue forever."""
        try:
            await self._write(batch)
            return len(batch)
        except Exception as exc:
            if not is_bad_data(exc):
                raise
            first_error = exc
        written = 0
        for rec in batch:
            try:
                await self._write([rec])
                written += 1
            except Exception as exc:
                if not is_bad_data(exc):
                    # An outage mid-way: the caller requeues the whole batch; the records
                    # written so far are deduplicated by their ids on the retry.
                    raise
                self._drop(1)
                log.error("dropped a usage record the database rejects (%s): %r", exc, rec)
        log.warning("a usage batch was rejected (%s); wrote %d of %d records one by one",
                    first_error, written, len(batch))
        return written

    def _requeue(self, batch: list[UsageRecord]) -> None:
        self._buffer.extendleft(reversed(batch))
        overflow = len(self._buffer) - self.config.max_buffered_records
        for _ in range(max(0, overflow)):
            self._buffer.popleft()
        if overflow > 0:
            self._drop(overflow)

    async def _write(self, batch: list[UsageRecord]) -> None:
        pool = None if self._db is None else self._db.pool
        if pool is None:
            raise ConnectionError("the usage database is not connected")
        await pool.execute(_INSERT, *_columns(batch), timeout=_WRITE_TIMEOUT_SECONDS)

    async def close(self, flush_seconds: float = _SHUTDOWN_FLUSH_SECONDS) -> None:
        """Stop the background task and flush what is left (bounded by `flush_seconds`)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._db is None or not self._buffer:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + flush_seconds
        delay = _BACKOFF_MIN_SECONDS
        while self._buffer:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining):
                    await self.flush()
            except Exception as exc:
                log.warning("usage flush at shutdown failed (%s); retrying", exc)
                await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
                delay = min(delay * 2, _BACKOFF_MAX_SECONDS)
        if self._buffer:
            log.error("shutdown: %d usage records could not be written", len(self._buffer))
            self._drop(len(self._buffer))
            self._buffer.clear()
        self._gauge()


USAGE_METER = web.AppKey("usage_meter", UsageMeter)


async def metering_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx (after db_ctx): starts the writer; on cleanup flushes the buffer."""
    meter = UsageMeter(app[CONFIG].metering, app[DB_POOL], app[METRICS])
    app[USAGE_METER] = meter
    meter.start()
    try:
        yield
    finally:
        await meter.close()
