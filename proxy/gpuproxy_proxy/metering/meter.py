"""Usage metering: one record per request, buffered in memory (bounded) and written to
PostgreSQL in batches by a background task; with a spool (spool.py) also on local disk from
admission to commit, and replayed after a crash (replay.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
from aiohttp import web

from gpuproxy_proxy.appkeys import CONFIG, METRICS
from gpuproxy_proxy.config import MeteringConfig
from gpuproxy_proxy.database.partitions import ensure_partitions_for
from gpuproxy_proxy.database.pool import DB_POOL, Database
from gpuproxy_proxy.metering.durable import DurableLog, SpoolFull, Ticket
from gpuproxy_proxy.metering.records import (
    INSERT,
    NO_PARTITION,
    UsageRecord,
    columns,
    is_bad_data,
)
from gpuproxy_proxy.metering.replay import replay_dead
from gpuproxy_proxy.observability.metrics import ProxyMetrics
from gpuproxy_proxy.runtime import RUNTIME

__all__ = ["USAGE_METER", "SpoolFull", "Ticket", "UsageMeter", "UsageRecord", "metering_ctx"]

log = logging.getLogger(__name__)

_BACKOFF_MIN_SECONDS = 0.5
_BACKOFF_MAX_SECONDS = 10.0
_SHUTDOWN_FLUSH_SECONDS = 10.0
_WRITE_TIMEOUT_SECONDS = 10.0
_REPLAY_EVERY_SECONDS = 30.0  # spools of sibling workers that died and were replaced
_DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


class UsageMeter:
    def __init__(
        self, config: MeteringConfig, db: Database | None, metrics: ProxyMetrics | None = None,
        *, worker_index: int = 0, workers: int = 1,
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
        self.replayed = 0
        self.durable: DurableLog | None = None
        if self._enabled and config.spool_dir:
            self.durable = DurableLog(Path(config.spool_dir), config, metrics,
                                      worker_index, workers)
        self._replay_due = 0.0

    @property
    def buffered(self) -> int:
        return len(self._buffer) + self._in_flight

    def admit(self, request_id: str, principal: Any, route: str, bytes_in: int,
              model: str | None = None) -> Ticket | None:
        """Before a request is forwarded: its admitted line is on disk (page cache) before the
        response starts. Raises SpoolFull under policy "reject"."""
        if self.durable is None or not self._enabled:
            return None
        return self.durable.admit(request_id, principal, route, bytes_in, model)

    def record(self, rec: UsageRecord, ticket: Ticket | None = None) -> None:
        """Queue one settled record; never blocks or raises on the request path."""
        if not self._enabled and ticket is None:
            return  # an admitted request is settled even if a reload turned metering off
        if self.durable is not None:
            self.durable.settle(rec, ticket)
        buf = self._buffer
        if len(buf) + self._in_flight >= self.config.max_buffered_records:
            if buf:
                self._let_go(buf.popleft())  # the oldest record goes first
            else:
                self._let_go(rec)
                return
        buf.append(rec)
        if len(buf) >= self.config.batch_size:
            self._wake.set()

    def _let_go(self, rec: UsageRecord) -> None:
        """Out of memory room: a spooled record is re-read from disk later, others are lost."""
        if self.durable is None or not self.durable.let_go(rec):
            self._drop(1)

    def _drop(self, count: int) -> None:
        self.dropped += count
        if self._metrics is not None:
            self._metrics.usage_records_dropped.inc(count)

    def _gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.usage_records_buffered.set(self.buffered)

    def reconfigure(self, config: MeteringConfig) -> None:
        """A config reload: batch size, interval, bounds and policy apply from the next batch;
        turning metering off stops recording, and what is buffered is still written. The
        spool directory is the one the process started with."""
        self.config = config
        self._enabled = config.enabled and self._db is not None
        if self.durable is not None:
            self.durable.reconfigure(config)
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
                await self._replay()
            except Exception as exc:  # the writer must outlive any single failure
                if not isinstance(exc, _DB_ERRORS):
                    log.exception("unexpected error writing usage records; retrying")
                elif not failing:  # once per outage, not once per retry
                    log.warning(
                        "usage records cannot be written (%s: %s); keeping up to %d in memory "
                        "%sand retrying with backoff", type(exc).__name__, exc,
                        self.config.max_buffered_records,
                        "and the rest in the spool " if self.durable else "",
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
            if self.durable is not None:
                self.durable.tick()
                try:
                    await self.durable.sync()
                except OSError as exc:
                    log.warning("cannot sync the metering spool to disk: %s", exc)
            self._gauge()

    async def _replay(self) -> None:
        """At start and then every _REPLAY_EVERY_SECONDS: the spools dead processes left."""
        durable = self.durable
        now = time.monotonic()
        if durable is None or now < self._replay_due:
            return
        spool = durable.spool
        written = await replay_dead(spool.directory, spool.owner, self._write_batch,
                                    self.config.batch_size, self._metrics)
        self.replayed += written
        self._replay_due = now + _REPLAY_EVERY_SECONDS

    async def flush(self) -> int:
        """Write everything buffered, batch by batch, then what was let go to the spool only;
        raises on a database error (the failed batch goes back to the front of the buffer)."""
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
            if self.durable is not None:
                self.durable.committed(batch)
            total += written
            self._count(written)
        if self.durable is not None:
            for seg in self.durable.spilled():
                count = seg.spilled
                recs = self.durable.reread(seg)
                for start in range(0, len(recs), self.config.batch_size):
                    await self._write_batch(recs[start:start + self.config.batch_size])
                self.durable.reread_done(seg, count)
                total += count
                self._count(count)
        return total

    def _count(self, written: int) -> None:
        self.written += written
        if self._metrics is not None:
            self._metrics.usage_records_written.inc(written)

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
        if str(getattr(first_error, "sqlstate", "")) == NO_PARTITION and self._db is not None:
            # A day without a partition yet (maintenance not run since, or an old replay).
            await ensure_partitions_for(self._db, min(r.created_unix for r in batch),
                                        self.config.retention_days)
            with contextlib.suppress(Exception):
                await self._write(batch)
                return len(batch)
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
            self._let_go(self._buffer.popleft())

    async def _write(self, batch: list[UsageRecord]) -> None:
        pool = None if self._db is None else self._db.pool
        if pool is None:
            raise ConnectionError("the usage database is not connected")
        await pool.execute(INSERT, *columns(batch), timeout=_WRITE_TIMEOUT_SECONDS)

    async def close(self, flush_seconds: float = _SHUTDOWN_FLUSH_SECONDS) -> None:
        """Stop the background task and flush what is left (bounded by `flush_seconds`);
        what could not be written stays in the spool for the next process's replay."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await self._final_flush(flush_seconds)
        finally:
            if self.durable is not None:
                self.durable.close()
        self._gauge()

    async def _final_flush(self, flush_seconds: float) -> None:
        if self._db is None or not (self._buffer or (self.durable and self.durable.spilled())):
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + flush_seconds
        delay = _BACKOFF_MIN_SECONDS
        while self._buffer or (self.durable and self.durable.spilled()):
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
            kept = sum(1 for r in self._buffer if r.segment is not None)
            lost = len(self._buffer) - kept
            log.error("shutdown: %d usage records could not be written (%d kept in the spool "
                      "for a replay)", len(self._buffer), kept)
            self._drop(lost)
            self._buffer.clear()


USAGE_METER = web.AppKey("usage_meter", UsageMeter)


async def metering_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx (after db_ctx): starts the writer; on cleanup flushes the buffer."""
    config = app[CONFIG]
    runtime = app.get(RUNTIME)
    meter = UsageMeter(config.metering, app[DB_POOL], app[METRICS],
                       worker_index=runtime.worker_index if runtime else 0,
                       workers=config.workers)
    app[USAGE_METER] = meter
    meter.start()
    try:
        yield
    finally:
        await meter.close()
