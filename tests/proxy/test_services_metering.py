"""Usage metering into real PostgreSQL through PgBouncer (transaction mode): batching, outage
retention and retry, bounded buffer, shutdown flush, and the app cleanup_ctx."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gpuproxy_proxy.appkeys import CONFIG, METRICS, SECRETS
from gpuproxy_proxy.config import DatabaseConfig, MeteringConfig, ProxyConfig, Secrets
from gpuproxy_proxy.database.pool import Database, db_ctx
from gpuproxy_proxy.metering.meter import USAGE_METER, UsageMeter, UsageRecord, metering_ctx
from gpuproxy_proxy.observability.metrics import ProxyMetrics


def db_config(pgbouncer: Any) -> DatabaseConfig:
    return DatabaseConfig(
        host=pgbouncer.host, port=pgbouncer.port, database=pgbouncer.database, sslmode="disable",
        pool_max_size=4,
    )


def db_secrets(pgbouncer: Any) -> Secrets:
    return Secrets(db_user=pgbouncer.user, db_password=pgbouncer.password)


@pytest.fixture
async def database(pgbouncer_server: Any) -> AsyncIterator[Database]:
    db = Database(db_config(pgbouncer_server), db_secrets(pgbouncer_server), ProxyMetrics())
    await db.connect_once()
    yield db
    await db.close()


def records(tag: str, count: int) -> list[UsageRecord]:
    return [
        UsageRecord(
            request_id=f"{tag}-{i}", principal_kind="api_key", user_id="u1",
            api_key_id=str(uuid.uuid4()), backend="gpu-a", route="/v1/chat/completions",
            status=200, bytes_in=100 + i, bytes_out=2000, duration_ms=12.5,
            prompt_tokens=10, completion_tokens=i, total_tokens=10 + i,
        )
        for i in range(count)
    ]


async def stored(dsn: str, tag: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn, statement_cache_size=0)
    try:
        return await conn.fetch(
            "SELECT * FROM usage_records WHERE request_id LIKE $1 ORDER BY bytes_in", tag + "-%"
        )
    finally:
        await conn.close()


async def wait_for(predicate: Any, seconds: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_records_written_in_batches(database: Database, pgbouncer_server: Any) -> None:
    metrics = ProxyMetrics()
    meter = UsageMeter(
        MeteringConfig(batch_size=10, flush_interval_seconds=0.2), database, metrics
    )
    meter.start()
    tag = uuid.uuid4().hex
    try:
        for rec in records(tag, 25):
            meter.record(rec)
        await wait_for(lambda: meter.written == 25)
    finally:
        await meter.close()
    rows = await stored(pgbouncer_server.dsn, tag)
    assert len(rows) == 25
    assert rows[3]["bytes_in"] == 103
    assert rows[3]["completion_tokens"] == 3
    assert rows[3]["route"] == "/v1/chat/completions"
    assert rows[3]["status"] == 200
    assert metrics.registry.get_sample_value("gpuproxy_usage_records_written_total") == 25


def logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records)


async def test_postgres_outage_keeps_and_retries(
    database: Database, postgres_server: Any, pgbouncer_server: Any
) -> None:
    # PgBouncer holds queries while PostgreSQL is away (up to its query_wait_timeout), so a
    # short outage shows up as a slow write; records keep queueing behind it meanwhile.
    meter = UsageMeter(MeteringConfig(batch_size=5, flush_interval_seconds=0.1), database)
    meter.start()
    tag = uuid.uuid4().hex
    try:
        first = records(tag, 30)
        for rec in first[:5]:
            meter.record(rec)
        await wait_for(lambda: meter.written == 5)
        postgres_server.stop()
        for rec in first[5:]:
            meter.record(rec)
        # A write is attempted during the outage (PgBouncer holds it): wait for that, not a
        # fixed time; nothing can be written while PostgreSQL is down.
        await wait_for(lambda: meter._in_flight > 0)
        assert meter.written == 5
        assert meter.buffered == 25
        assert meter.dropped == 0
        postgres_server.start()
        await wait_for(lambda: meter.written == 30, seconds=120)
    finally:
        postgres_server.start()
        await meter.close()
    rows = await stored(pgbouncer_server.dsn, tag)
    assert sorted(r["request_id"] for r in rows) == sorted(r.request_id for r in first)


async def test_buffer_is_bounded_oldest_dropped() -> None:
    metrics = ProxyMetrics()
    # A database that never connects: everything stays in the buffer.
    never = Database(DatabaseConfig(host="127.0.0.1", port=1), Secrets())
    meter = UsageMeter(MeteringConfig(max_buffered_records=5), never, metrics)
    tag = uuid.uuid4().hex
    for rec in records(tag, 8):
        meter.record(rec)
    assert meter.buffered == 5
    assert meter.dropped == 3
    assert metrics.registry.get_sample_value("gpuproxy_usage_records_dropped_total") == 3
    with pytest.raises(ConnectionError):
        await meter.flush()
    # The failed batch went back in order: the newest five survive.
    assert meter.buffered == 5
    assert [r.request_id for r in meter._buffer] == [f"{tag}-{i}" for i in range(3, 8)]


async def test_shutdown_flushes_buffer(database: Database, pgbouncer_server: Any) -> None:
    meter = UsageMeter(MeteringConfig(batch_size=1000, flush_interval_seconds=3600), database)
    meter.start()
    tag = uuid.uuid4().hex
    for rec in records(tag, 7):
        meter.record(rec)
    await asyncio.sleep(0.1)
    assert meter.written == 0  # neither the interval nor the batch size was reached
    await meter.close()
    assert meter.written == 7
    assert len(await stored(pgbouncer_server.dsn, tag)) == 7


async def test_retry_does_not_duplicate(database: Database, pgbouncer_server: Any) -> None:
    # A batch whose acknowledgement was lost is retried with the same record ids.
    meter = UsageMeter(MeteringConfig(), database)
    tag = uuid.uuid4().hex
    batch = records(tag, 3)
    for rec in batch:
        meter.record(rec)
    await meter.flush()
    for rec in batch:
        meter.record(rec)
    await meter.flush()
    assert len(await stored(pgbouncer_server.dsn, tag)) == 3


async def test_metering_ctx_in_app(pgbouncer_server: Any) -> None:
    app = web.Application()
    app[CONFIG] = ProxyConfig(
        database=db_config(pgbouncer_server),
        metering=MeteringConfig(flush_interval_seconds=3600),
    )
    app[SECRETS] = db_secrets(pgbouncer_server)
    app[METRICS] = ProxyMetrics()
    app.cleanup_ctx.append(db_ctx)
    app.cleanup_ctx.append(metering_ctx)
    tag = uuid.uuid4().hex

    async def handler(request: web.Request) -> web.Response:
        rec = records(tag, 1)[0]
        rec.request_id = f"{tag}-{request.query['n']}"
        request.app[USAGE_METER].record(rec)
        return web.Response(text="ok")

    app.router.add_get("/", handler)
    async with TestClient(TestServer(app)) as client:
        for n in range(4):
            assert (await client.get("/", params={"n": str(n)})).status == 200
        registry = app[METRICS].registry
        await wait_for(lambda: registry.get_sample_value("gpuproxy_db_connections_max") == 4)
    # Closing the app ran the cleanup: the buffer was flushed before the pool closed.
    assert len(await stored(pgbouncer_server.dsn, tag)) == 4


async def test_metering_without_database_is_a_no_op() -> None:
    meter = UsageMeter(MeteringConfig(), None)
    meter.start()
    for rec in records("x", 3):
        meter.record(rec)
    assert meter.buffered == 0
    await meter.close()


async def test_bad_record_is_dropped_not_retried_forever(
    database: Database, pgbouncer_server: Any
) -> None:
    metrics = ProxyMetrics()
    meter = UsageMeter(MeteringConfig(), database, metrics)
    tag = uuid.uuid4().hex
    batch = records(tag, 4)
    batch[1].route = "/v1/\x00bad"  # PostgreSQL text cannot hold NUL (SQLSTATE 22021)
    batch[2].status = 2**40  # does not fit the integer column (asyncpg DataError)
    for rec in batch:
        meter.record(rec)
    assert await meter.flush() == 2
    assert meter.buffered == 0
    assert meter.dropped == 2
    rows = await stored(pgbouncer_server.dsn, tag)
    assert [r["request_id"] for r in rows] == [f"{tag}-0", f"{tag}-3"]
    assert metrics.registry.get_sample_value("gpuproxy_usage_records_dropped_total") == 2


async def test_pgbouncer_restart_keeps_and_retries(
    database: Database, pgbouncer_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gpuproxy_proxy.metering.meter")
    meter = UsageMeter(MeteringConfig(batch_size=5, flush_interval_seconds=0.1), database)
    meter.start()
    tag = uuid.uuid4().hex
    batch = records(tag, 12)
    try:
        pgbouncer_server.stop()  # every pooled client connection breaks
        for rec in batch:
            meter.record(rec)
        # Wait until a write has failed (refused connections), not a fixed time.
        await wait_for(lambda: logged(caplog, "cannot be written"))
        assert meter.written == 0
        assert meter.buffered == 12
        pgbouncer_server.start()
        await wait_for(lambda: meter.written == 12, seconds=120)
    finally:
        pgbouncer_server.start()
        await meter.close()
    assert len(await stored(pgbouncer_server.dsn, tag)) == 12
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cannot be written" in m for m in messages) == 1  # once per outage
    assert sum("written again" in m for m in messages) == 1


async def test_pool_gauges(pgbouncer_server: Any) -> None:
    metrics = ProxyMetrics()
    db = Database(db_config(pgbouncer_server), db_secrets(pgbouncer_server), metrics)
    await db.connect_once()
    try:
        assert db.pool is not None
        async with db.pool.acquire(), db.pool.acquire():
            db.update_gauges()
            assert metrics.registry.get_sample_value("gpuproxy_db_connections_active") == 2
        db.update_gauges()
        assert metrics.registry.get_sample_value("gpuproxy_db_connections_active") == 0
        assert metrics.registry.get_sample_value("gpuproxy_db_connections_max") == 4
    finally:
        await db.close()


@pytest.mark.slow
async def test_long_postgres_outage_times_out_and_recovers(
    database: Database, postgres_server: Any, pgbouncer_server: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Longer than the write timeout: writes fail (not just stall), records stay, and they
    # are written once PostgreSQL is back.
    caplog.set_level(logging.WARNING, logger="gpuproxy_proxy.metering.meter")
    meter = UsageMeter(MeteringConfig(batch_size=5, flush_interval_seconds=0.1), database)
    meter.start()
    tag = uuid.uuid4().hex
    batch = records(tag, 8)
    try:
        postgres_server.stop()
        for rec in batch:
            meter.record(rec)
        # The first failure needs the 10 s write timeout (PgBouncer holds the query first).
        await wait_for(lambda: logged(caplog, "cannot be written"), seconds=120)
        assert meter.written == 0
        assert meter.buffered == 8
        postgres_server.start()
        await wait_for(lambda: meter.written == 8, seconds=120)
    finally:
        postgres_server.start()
        await meter.close()
    assert len(await stored(pgbouncer_server.dsn, tag)) == 8
