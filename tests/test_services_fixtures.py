"""Proves the real-server fixtures: Redis PING, PostgreSQL direct and via PgBouncer, restarts."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis
import redis.exceptions

from tests.services import PgBouncerServer, PostgresServer, RedisServer, ServiceRegistry
from tests.tools import hadolint_binary, helm_binary, kubectl_binary


async def _redis_roundtrip(server: RedisServer) -> None:
    client = aioredis.Redis.from_url(server.url)
    try:
        assert await client.ping() is True
        await client.set("gpuproxy:fixture", "ok")
        assert await client.get("gpuproxy:fixture") == b"ok"
    finally:
        await client.aclose()


async def _pg_whoami(dsn: str) -> tuple[str, str]:
    # Generous: after a restart PgBouncer holds the login until PostgreSQL takes it.
    conn = await asyncpg.connect(dsn, statement_cache_size=0, timeout=60)
    try:
        row = await conn.fetchrow("SELECT current_user::text AS u, current_database()::text AS d")
        assert row is not None
        return row["u"], row["d"]
    finally:
        await conn.close()


async def test_redis_ping_and_roundtrip(redis_server: RedisServer) -> None:
    assert redis_server.host == "127.0.0.1"
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    await _redis_roundtrip(redis_server)


async def test_redis_has_no_persistence(redis_server: RedisServer) -> None:
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        config = await client.config_get("save")
        assert config["save"] == ""
        assert (await client.config_get("appendonly"))["appendonly"] == "no"
    finally:
        await client.aclose()


async def test_redis_stop_start_same_port(redis_server: RedisServer) -> None:
    port = redis_server.port
    redis_server.stop()
    assert not redis_server.running
    with pytest.raises(redis.exceptions.ConnectionError):
        await _redis_roundtrip(redis_server)
    redis_server.start()
    assert redis_server.port == port
    await _redis_roundtrip(redis_server)


async def test_postgres_direct_login(postgres_server: PostgresServer) -> None:
    assert postgres_server.host == "127.0.0.1"
    assert postgres_server.database == "gpuproxy"
    user, database = await _pg_whoami(postgres_server.dsn)
    assert (user, database) == (postgres_server.user, postgres_server.database)


async def test_postgres_rejects_wrong_password(postgres_server: PostgresServer) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(
            host=postgres_server.host,
            port=postgres_server.port,
            user=postgres_server.user,
            password=postgres_server.password + "x",
            database=postgres_server.database,
            timeout=60,
        )


async def test_postgres_runs_unprivileged(postgres_server: PostgresServer) -> None:
    conn = await asyncpg.connect(postgres_server.dsn, statement_cache_size=0)
    try:
        assert await conn.fetchval("SHOW listen_addresses") == "127.0.0.1"
        assert await conn.fetchval("SHOW password_encryption") == "scram-sha-256"
    finally:
        await conn.close()
    if os.geteuid() == 0:
        assert postgres_server.pid is not None
        assert os.stat(f"/proc/{postgres_server.pid}").st_uid != 0


async def test_pgbouncer_transaction_pooling(pgbouncer_server: PgBouncerServer) -> None:
    assert pgbouncer_server.pool_mode == "transaction"
    user, database = await _pg_whoami(pgbouncer_server.dsn)
    assert (user, database) == (pgbouncer_server.user, pgbouncer_server.database)
    conn = await asyncpg.connect(pgbouncer_server.dsn, statement_cache_size=0)
    try:
        # Prepared statements with arguments must work through the pooler with the cache off.
        assert await conn.fetchval("SELECT $1::int + 1", 41) == 42
        async with conn.transaction():
            await conn.execute("CREATE TEMP TABLE t (x int) ON COMMIT DROP")
            await conn.execute("INSERT INTO t VALUES (1), (2)")
            assert await conn.fetchval("SELECT sum(x) FROM t") == 3
    finally:
        await conn.close()


def test_pgbouncer_admin_console(
    pgbouncer_server: PgBouncerServer, postgres_server: PostgresServer
) -> None:
    result = subprocess.run(
        [str(postgres_server.bindir / "psql"), "-X", "-A", "-t", "-c", "SHOW CONFIG"],
        env={**os.environ, "PGDATABASE": "pgbouncer", **_libpq_env(pgbouncer_server)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    config = dict(line.split("|")[:2] for line in result.stdout.splitlines() if "|" in line)
    assert config["pool_mode"] == "transaction"
    assert config["auth_type"] in {"scram-sha-256", "md5"}


def _libpq_env(server: PgBouncerServer) -> dict[str, str]:
    return {
        "PGHOST": server.host,
        "PGPORT": str(server.port),
        "PGUSER": server.user,
        "PGPASSWORD": server.password,
    }


async def test_pgbouncer_survives_postgres_restart(
    pgbouncer_server: PgBouncerServer, postgres_server: PostgresServer
) -> None:
    postgres_port = postgres_server.port
    postgres_server.stop()
    with pytest.raises(ConnectionRefusedError):
        await _pg_whoami(postgres_server.dsn)
    postgres_server.start()
    assert postgres_server.port == postgres_port
    user, _ = await _pg_whoami(pgbouncer_server.dsn)
    assert user == pgbouncer_server.user


async def test_pgbouncer_stop_start_same_port(pgbouncer_server: PgBouncerServer) -> None:
    port = pgbouncer_server.port
    pgbouncer_server.stop()
    with pytest.raises(ConnectionRefusedError):
        await _pg_whoami(pgbouncer_server.dsn)
    pgbouncer_server.start()
    assert pgbouncer_server.port == port
    user, _ = await _pg_whoami(pgbouncer_server.dsn)
    assert user == pgbouncer_server.user


def test_registry_restarts_stopped_servers(
    redis_server: RedisServer, service_registry: ServiceRegistry
) -> None:
    # The autouse teardown calls this, so a test that forgets to end its outage breaks no other.
    port = redis_server.port
    redis_server.stop()
    service_registry.restart_stopped()
    assert redis_server.running
    assert redis_server.port == port


@pytest.mark.parametrize(
    ("locate", "args"),
    [
        (helm_binary, ["version", "--short"]),
        (kubectl_binary, ["version", "--client"]),
        (hadolint_binary, ["--version"]),
    ],
)
def test_tool_binaries_run(locate: Callable[[], Path], args: list[str]) -> None:
    path = locate()
    result = subprocess.run(
        [str(path), *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"{path}: {result.stdout}{result.stderr}"
    if locate is helm_binary:
        assert result.stdout.startswith("v4."), result.stdout
