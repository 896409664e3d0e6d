"""The meter's side of the spool: admission tickets, progress and settled lines, the spool-full
policy, and the bookkeeping that lets a segment go once none of its records can be lost."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from gpuproxy_proxy.config import MeteringConfig
from gpuproxy_proxy.metering.records import UsageRecord, from_settled, new_record_id
from gpuproxy_proxy.metering.spool import Segment, Spool, encode
from gpuproxy_proxy.observability.metrics import ProxyMetrics

log = logging.getLogger(__name__)


class SpoolFull(Exception):
    """Policy "reject": the spool is at its bound, the request is refused (503)."""


class Ticket:
    """One admitted request: its row key, fixed now, and the one segment holding its latest
    line (admitted or progress; each carries everything an interrupted record needs, so a
    long stream never pins the segment it started in)."""

    __slots__ = ("_log", "admitted", "created", "due", "record_id", "segment")

    def __init__(self, log_: DurableLog, interval: float) -> None:
        self._log = log_
        self.record_id = new_record_id()
        self.created = time.time()
        self.segment: Segment | None = None
        self.admitted: dict[str, Any] = {}
        self.due = time.monotonic() + interval

    def progress(self, status: int, backend: str | None, bytes_out: int,
                 tokens: int | None) -> None:
        """A progress line: the caller (a streaming response) calls it once `due` passed,
        with the completion tokens counted so far, however it counts them."""
        self.due = time.monotonic() + self._log.config.progress_interval_seconds
        self._log.write(self, {**self.admitted, "t": "p", "at": time.time(), "st": status,
                               "b": backend, "bo": bytes_out, "ct": tokens})

    def release(self) -> None:
        if self.segment is not None:
            self.segment.holds -= 1
            self.segment = None


class DurableLog:
    def __init__(self, directory: Path, config: MeteringConfig, metrics: ProxyMetrics | None,
                 worker_index: int = 0, workers: int = 1) -> None:
        self.config = config
        self._workers = max(1, workers)
        self.spool = Spool(directory, worker_index,
                           segment_bytes=min(4 * 1024 * 1024, self.budget // 8))
        self._metrics = metrics
        self._failing = False
        if metrics is not None:
            metrics.metering_spool_bytes.set_function(lambda: float(self.spool.bytes))
            metrics.metering_spool_oldest_seconds.set_function(self.spool.oldest_seconds)

    @property
    def budget(self) -> int:
        return self.config.spool_max_bytes // self._workers

    def reconfigure(self, config: MeteringConfig) -> None:
        self.config = config

    def admit(self, request_id: str, principal: Any, route: str, bytes_in: int,
              model: str | None = None) -> Ticket:
        if self.spool.bytes >= self.budget:
            self._full()
        ticket = Ticket(self, self.config.progress_interval_seconds)
        ticket.admitted = {"t": "a", "id": ticket.record_id.hex, "ts": ticket.created,
                           "rid": request_id, "pk": principal.kind, "u": principal.user_id,
                           "k": principal.api_key_id, "r": route, "bi": bytes_in,
                           "m": model, "tm": principal.team}
        self.write(ticket, ticket.admitted)
        return ticket

    def _full(self) -> None:
        if self.config.on_spool_full == "reject":
            if self._metrics is not None:
                self._metrics.metering_spool_full.labels("rejected").inc()
            raise SpoolFull
        while self.spool.bytes >= self.budget:
            seg = self.spool.drop_oldest()
            if seg is None:
                break
            lost = seg.unflushed + seg.holds
            log.warning("metering spool full: dropped its oldest segment (%d records lose "
                        "their crash-safe copy, %d of them are not in memory either)",
                        lost, seg.spilled)
            if self._metrics is not None:
                self._metrics.metering_spool_full.labels("dropped").inc(lost)
                self._metrics.usage_records_dropped.inc(seg.spilled)

    def write(self, ticket: Ticket | None, entry: dict[str, Any]) -> Segment | None:
        try:
            seg = self.spool.append(encode(entry))
        except OSError as exc:
            if self._metrics is not None:
                self._metrics.metering_spool_write_errors.inc()
            if not self._failing:
                log.error("cannot write the metering spool (%s); records are kept in memory "
                          "only until it works again", exc)
            self._failing = True
            return None
        self._failing = False
        if ticket is not None and seg is not ticket.segment:
            # The newest line supersedes the older ones: hold its segment, let the old go.
            seg.holds += 1
            ticket.release()
            ticket.segment = seg
        return seg

    def settle(self, rec: UsageRecord, ticket: Ticket | None) -> None:
        """The settled line, then the admission's holds go: from now on this line is the
        record's crash-safe copy until the database has it."""
        if ticket is not None:
            rec.record_id = ticket.record_id
            rec.created_unix = ticket.created
        else:
            if rec.record_id is None:
                rec.record_id = new_record_id()
            if self.spool.bytes >= self.budget:
                # Not admitted (401, 429, 503 spool full...): memory only once the spool is
                # full, or the refusals themselves would grow it without bound.
                return
        seg = self.write(None, rec.entry())
        if seg is not None:
            seg.unflushed += 1
            rec.segment = seg
            if ticket is not None:
                ticket.release()
        elif ticket is not None:
            # The settled line did not make it: the admitted one stays the crash-safe copy
            # (an interrupted record at worst) until the database has the record.
            rec.segment = ticket

    def let_go(self, rec: UsageRecord) -> bool:
        """The memory buffer is full: True when the record stays on disk (re-read later)."""
        seg = rec.segment
        if isinstance(seg, Segment) and not seg.deleted:
            seg.spilled += 1
            return True
        if isinstance(seg, Ticket):
            seg.release()
        return False

    def committed(self, batch: list[UsageRecord]) -> None:
        for rec in batch:
            seg = rec.segment
            if isinstance(seg, Segment):
                seg.unflushed -= 1
            elif isinstance(seg, Ticket):
                seg.release()
            rec.segment = None
        self.spool.collect()

    def spilled(self) -> list[Segment]:
        return [seg for seg in self.spool.segments if seg.spilled]

    def reread(self, seg: Segment) -> list[UsageRecord]:
        """The settled records of a segment whose in-memory copies were let go (the others
        in it are written again harmlessly: inserts are idempotent)."""
        return [from_settled(e) for e in self.spool.read(seg) if e.get("t") == "s"]

    def reread_done(self, seg: Segment, count: int) -> None:
        seg.spilled -= count
        seg.unflushed -= count
        self.spool.collect()

    def tick(self) -> None:
        self.spool.tick()

    async def sync(self) -> None:
        """Once per writer loop: what was spooled since reaches the disk, in a thread."""
        pending = self.spool.unsynced()
        if pending and self.config.spool_fsync:
            await asyncio.to_thread(self.spool.sync, pending)
            for seg, size in pending:
                seg.synced = max(seg.synced, size)

    def close(self) -> None:
        self.spool.close()
