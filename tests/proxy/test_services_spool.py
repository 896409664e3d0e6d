"""The metering spool against real PostgreSQL through PgBouncer: a dead process's spool is
replayed (settled as they were, unsettled as interrupted with the progress counted), torn
writes are skipped, the memory bound spills to disk, and the spool-full policies."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from tests.proxy.test_services_metering import database, db_config, records, wait_for

from gpuproxy_proxy.auth.principal import ANONYMOUS
from gpuproxy_proxy.config import DatabaseConfig, MeteringConfig, Secrets
from gpuproxy_proxy.database.pool import Database
from gpuproxy_proxy.metering.meter import SpoolFull, UsageMeter
from gpuproxy_proxy.metering.spool import SEGMENT_SUFFIX
from gpuproxy_proxy.observability.metrics import ProxyMetrics

__all__ = ["database", "db_config"]


async def rows_for(dsn: str, tag: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn, statement_cache_size=0)
    try:
        return await conn.fetch(
            "SELECT * FROM usage_records WHERE request_id LIKE $1 ORDER BY request_id",
            tag + "-%")
    finally:
        await conn.close()


def die(meter: UsageMeter) -> None:
    """What a SIGKILL leaves: the files as written, the flock released, nothing flushed."""
    assert meter.durable is not None
    spool = meter.durable.spool
    for seg in spool.segments:
        if seg.fd is not None:
            os.close(seg.fd)
            seg.fd = None
    os.close(spool._lock_fd)


def spool_config(path: Path, **kw: Any) -> MeteringConfig:
    return MeteringConfig(spool_dir=str(path), flush_interval_seconds=0.1, **kw)


async def test_dead_spool_replayed_settled_and_interrupted(
    tmp_path: Path, database: Database, pgbouncer_server: Any
) -> None:
    never = Database(DatabaseConfig(host="127.0.0.1", port=1), Secrets())
    tag = uuid.uuid4().hex
    dead = UsageMeter(spool_config(tmp_path, progress_interval_seconds=0.001), never)
    tickets = [dead.admit(f"{tag}-{i}", ANONYMOUS, "chat_completions", 10) for i in range(6)]
    settled = records(tag, 3)
    for rec, ticket in zip(settled, tickets[:3], strict=True):
        dead.record(rec, ticket)
    # Two streams got somewhere before the crash, one did not.
    for ticket in tickets[3:5]:
        assert ticket is not None
        ticket.due = 0.0
        ticket.progress(200, "gpu-a", 1234, 17)
    assert dead.durable is not None
    segment = dead.durable.spool.current.path
    die(dead)
    with segment.open("ab") as torn:  # the last write, cut short
        torn.write(b'0badc0de {"t":"s","id":"')
    copy = segment.read_bytes()

    meter = UsageMeter(spool_config(tmp_path), database)
    meter.start()
    try:
        await wait_for(lambda: meter.replayed == 6)
    finally:
        await meter.close()
    rows = await rows_for(pgbouncer_server.dsn, tag)
    assert len(rows) == 6
    by_id = {r["request_id"]: r for r in rows}
    for i in range(3):
        assert by_id[f"{tag}-{i}"]["outcome"] == "complete"
        assert by_id[f"{tag}-{i}"]["completion_tokens"] == i
    for i in (3, 4):
        row = by_id[f"{tag}-{i}"]
        assert (row["outcome"], row["status"], row["completion_tokens"], row["bytes_out"],
                row["backend"]) == ("interrupted", 200, 17, 1234, "gpu-a")
    assert by_id[f"{tag}-5"]["outcome"] == "interrupted"
    assert by_id[f"{tag}-5"]["completion_tokens"] is None
    # The dead spool is gone, and the live meter closed cleanly: nothing is left.
    assert not list(tmp_path.iterdir())

    # The same lines replayed again (a replay cut before its delete) add nothing.
    (tmp_path / ("w9-1-deadbeef.00000001" + SEGMENT_SUFFIX)).write_bytes(copy)
    again = UsageMeter(spool_config(tmp_path), database)
    await again._replay()
    await again.close()
    assert again.replayed == 6
    assert len(await rows_for(pgbouncer_server.dsn, tag)) == 6
    assert not list(tmp_path.iterdir())


async def test_memory_bound_spills_to_the_spool_and_is_reread(
    tmp_path: Path, database: Database, pgbouncer_server: Any
) -> None:
    # Far more records than the memory bound while the database is unreachable: none lost.
    real_pool = database.pool
    meter = UsageMeter(spool_config(tmp_path, max_buffered_records=5, batch_size=7), database)
    tag = uuid.uuid4().hex
    database.pool = None
    try:
        for i, rec in enumerate(records(tag, 40)):
            meter.record(rec, meter.admit(f"{tag}-{i}", ANONYMOUS, "completions", 1))
        assert meter.buffered == 5
        assert meter.dropped == 0
        with pytest.raises(ConnectionError):
            await meter.flush()
    finally:
        database.pool = real_pool
    assert meter.durable is not None
    await meter.durable.sync()  # the writer loop's periodic fdatasync, off the event loop
    assert all(seg.synced == seg.size for seg in meter.durable.spool.segments)
    await meter.flush()
    assert meter.dropped == 0
    assert len(await rows_for(pgbouncer_server.dsn, tag)) == 40
    await meter.close()
    assert not list(tmp_path.iterdir())


async def test_spool_full_reject_and_drop_oldest(tmp_path: Path) -> None:
    never = Database(DatabaseConfig(host="127.0.0.1", port=1), Secrets())
    metrics = ProxyMetrics()
    limit = 64 * 1024
    meter = UsageMeter(spool_config(tmp_path / "r", spool_max_bytes=limit), never, metrics)
    tag = uuid.uuid4().hex
    accepted = 0
    for i, rec in enumerate(records(tag, 10_000)):
        try:
            ticket = meter.admit(f"{tag}-{i}", ANONYMOUS, "completions", 1)
        except SpoolFull:
            break
        meter.record(rec, ticket)
        accepted += 1
    assert 50 < accepted < 10_000
    assert meter.durable is not None
    assert limit <= meter.durable.spool.bytes < limit + 4096
    # The refused requests' own records (503) stay in memory: the spool does not grow.
    size = meter.durable.spool.bytes
    for rec in records(tag + "-refused", 100):
        meter.record(rec)
    assert meter.durable.spool.bytes == size
    assert metrics.registry.get_sample_value(
        "gpuproxy_metering_spool_full_total", {"action": "rejected"}) == 1
    assert metrics.registry.get_sample_value("gpuproxy_metering_spool_bytes") == float(
        meter.durable.spool.bytes)

    metrics = ProxyMetrics()
    meter = UsageMeter(spool_config(tmp_path / "d", spool_max_bytes=limit,
                                    on_spool_full="drop_oldest"), never, metrics)
    for i, rec in enumerate(records(tag, 3000)):
        meter.record(rec, meter.admit(f"{tag}-{i}", ANONYMOUS, "completions", 1))
    assert meter.durable is not None
    assert meter.durable.spool.bytes < limit + limit // 8 + 4096
    dropped = metrics.registry.get_sample_value(
        "gpuproxy_metering_spool_full_total", {"action": "dropped"})
    assert dropped is not None
    assert dropped > 1000
    segments = sorted((tmp_path / "d").glob("*" + SEGMENT_SUFFIX))
    assert 1 < len(segments) <= 10
    assert (metrics.registry.get_sample_value("gpuproxy_metering_spool_oldest_seconds")
            or 0.0) >= 0.0


async def test_a_long_stream_pins_only_the_segment_of_its_latest_line(
    tmp_path: Path, database: Database, pgbouncer_server: Any
) -> None:
    never = Database(DatabaseConfig(host="127.0.0.1", port=1), Secrets())
    tag = uuid.uuid4().hex
    dead = UsageMeter(spool_config(tmp_path), never)
    ticket = dead.admit(f"{tag}-0", ANONYMOUS, "chat_completions", 10)
    assert ticket is not None
    assert dead.durable is not None
    spool = dead.durable.spool
    first = spool.current
    for step in range(1, 4):  # the stream goes on while segments rotate under it
        spool.rotate()
        ticket.due = 0.0
        ticket.progress(200, "gpu-a", 100 * step, 10 * step)
        spool.tick()
        # Only the segment of its newest line is kept, whatever it was admitted in.
        assert list(spool.segments) == [spool.current]
        assert spool.current.holds == 1
    assert first.deleted
    assert not first.path.exists()
    die(dead)

    meter = UsageMeter(spool_config(tmp_path), database)
    await meter._replay()
    await meter.close()
    [row] = await rows_for(pgbouncer_server.dsn, tag)
    # Settled from its last progress line alone: the admission's segment is long gone.
    assert (row["outcome"], row["completion_tokens"], row["bytes_out"],
            row["principal_kind"], row["route"]) == (
        "interrupted", 30, 300, "anonymous", "chat_completions")


async def test_a_failing_spool_write_keeps_the_record_in_memory_and_is_counted(
    tmp_path: Path, database: Database, pgbouncer_server: Any
) -> None:
    metrics = ProxyMetrics()
    meter = UsageMeter(spool_config(tmp_path), database, metrics)
    assert meter.durable is not None
    seg = meter.durable.spool.current
    assert seg.fd is not None
    os.close(seg.fd)
    seg.fd = os.open(os.devnull, os.O_RDONLY)  # as if the disk went away: writes fail
    tag = uuid.uuid4().hex
    try:
        for i, rec in enumerate(records(tag, 3)):
            meter.record(rec, meter.admit(f"{tag}-{i}", ANONYMOUS, "completions", 1))
        assert metrics.registry.get_sample_value(
            "gpuproxy_metering_spool_write_errors_total") == 6  # admitted + settled, each
        assert await meter.flush() == 3
        # Writes work again: an admission whose settled line fails keeps its admitted line
        # (and segment) until the database has the record.
        os.close(seg.fd)
        seg.fd = os.open(seg.path, os.O_WRONLY | os.O_APPEND)
        ticket = meter.admit(f"{tag}-3", ANONYMOUS, "completions", 1)
        os.close(seg.fd)
        seg.fd = os.open(os.devnull, os.O_RDONLY)
        [rec] = records(tag + "-x", 1)
        rec.request_id = f"{tag}-3"
        meter.record(rec, ticket)
        assert seg.holds == 1
        assert await meter.flush() == 1
        assert seg.holds == 0
    finally:
        await meter.close()
    assert len(await rows_for(pgbouncer_server.dsn, tag)) == 4
