"""Retention of usage_records on real PostgreSQL: the upgrade from the unpartitioned table keeps
every row, daily partitions are created ahead and on demand, and expired ones are dropped by
concurrent maintenance runs through PgBouncer without a conflict."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from tests.proxy.test_services_metering import database, records

from gpuproxy_proxy.config import MeteringConfig
from gpuproxy_proxy.database import migrations
from gpuproxy_proxy.database.partitions import DAYS_AHEAD, maintain
from gpuproxy_proxy.database.pool import Database
from gpuproxy_proxy.metering.meter import UsageMeter

__all__ = ["database"]

_PARTITIONS = """
SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'usage_records'::regclass
"""


def _day(offset: int) -> date:
    return datetime.now(UTC).date() + timedelta(days=offset)


def _noon(offset: int) -> float:
    d = _day(offset)
    return datetime(d.year, d.month, d.day, 12, tzinfo=UTC).timestamp()


async def test_upgrade_from_the_unpartitioned_table_keeps_every_row(
    postgres_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = "mig_" + uuid.uuid4().hex[:12]
    admin = await asyncpg.connect(postgres_server.superuser_dsn)
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        conn = await asyncpg.connect(postgres_server.superuser_dsn.replace(
            "/postgres?", f"/{name}?"))
        try:
            with monkeypatch.context() as m:
                m.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:2])
                assert await migrations.apply_migrations(conn) == [1, 2]
            old = [(uuid.uuid4(), f"old-{i}", datetime.fromtimestamp(_noon(-i), UTC))
                   for i in range(5)]
            await conn.executemany(
                "INSERT INTO usage_records (id, request_id, principal_kind, route, status, "
                "created_at) VALUES ($1, $2, 'anonymous', 'other', 200, $3)", old)

            assert await migrations.apply_migrations(conn) == [3, 4, 5, 6]

            rows = await conn.fetch("SELECT id, request_id, outcome, model, team "
                                    "FROM usage_records")
            assert sorted(r["request_id"] for r in rows) == sorted(o[1] for o in old)
            assert {r["outcome"] for r in rows} == {"complete"}
            # Migration 6's columns reach the old table's partition too, empty.
            assert {(r["model"], r["team"]) for r in rows} == {(None, None)}
            parts = {r["relname"]: r["bound"] for r in await conn.fetch(_PARTITIONS)}
            # The old table is the partition up to tomorrow; new days come after it.
            assert "MINVALUE" in parts.pop("usage_records_legacy")
            assert f"usage_records_p{_day(DAYS_AHEAD):%Y%m%d}" in parts
            assert f"usage_records_p{_day(0):%Y%m%d}" not in parts
            # The idempotency key works on the old rows too.
            status = await conn.execute(
                "INSERT INTO usage_records (id, request_id, principal_kind, route, status, "
                "created_at) VALUES ($1, 'dup', 'anonymous', 'other', 200, $2) "
                "ON CONFLICT (id, created_at) DO NOTHING", old[0][0], old[0][2])
            assert status == "INSERT 0 0"
            assert await migrations.apply_migrations(conn) == []
        finally:
            await conn.close()
    finally:
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        await admin.close()


async def test_partitions_on_demand_and_retention_through_pgbouncer(
    database: Database, pgbouncer_server: Any
) -> None:
    await maintain(database, None, _day(-5))
    meter = UsageMeter(MeteringConfig(retention_days=90), database)
    tag = uuid.uuid4().hex
    recs = records(tag, 2)
    recs[0].created_unix = _noon(-10)  # no partition yet: created on demand
    recs[1].created_unix = _noon(-4)
    for rec in recs:
        meter.record(rec)
    assert await meter.flush() == 2
    assert meter.dropped == 0

    conn = await asyncpg.connect(pgbouncer_server.dsn, statement_cache_size=0)
    try:
        count = "SELECT count(*) FROM usage_records WHERE request_id LIKE $1"
        assert await conn.fetchval(count, tag + "-%") == 2
        cutoff = datetime.combine(_day(-2), datetime.min.time(), UTC)
        expired = {r["relname"] for r in await conn.fetch(_PARTITIONS)
                   if r["relname"].startswith("usage_records_p")
                   and datetime.strptime(r["relname"][-8:], "%Y%m%d").replace(tzinfo=UTC)
                   + timedelta(days=1) <= cutoff}
        assert f"usage_records_p{_day(-10):%Y%m%d}" in expired

        # Every pod's workers run it; the advisory lock makes them take turns.
        results = await asyncio.gather(*(maintain(database, 2) for _ in range(4)))
        assert sum(dropped for _, dropped in results) == len(expired)

        names = {r["relname"] for r in await conn.fetch(_PARTITIONS)}
        assert not names & expired
        assert {f"usage_records_p{_day(n):%Y%m%d}" for n in range(-2, DAYS_AHEAD + 1)} <= names
        assert await conn.fetchval(count, tag + "-%") == 0  # both were older than 2 days
    finally:
        await conn.close()
