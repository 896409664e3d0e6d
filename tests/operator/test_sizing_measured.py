"""The measured figures behind the derived resources, re-measured on the real servers: PgBouncer
memory per idle and per busy client (rendered config), Redis bytes per rate-limit key (the
proxy's own Lua script). `-s` prints the measurements."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import asyncpg
import pytest
import redis
from tests.operator.rendered_pgbouncer import PgBouncerPod
from tests.services import LOOPBACK, PostgresServer, RedisServer

from gpuproxy_operator.builders import DatabaseCredentials
from gpuproxy_operator.sizing import (
    PGBOUNCER_ACTIVE_CLIENT_KIB,
    PGBOUNCER_BASE_MIB,
    PGBOUNCER_IDLE_CLIENT_KIB,
    REDIS_BYTES_PER_KEY,
    REDIS_KEYS_PER_CLIENT,
)
from gpuproxy_proxy.limits.lua import SLIDING_WINDOW_LUA

pytestmark = pytest.mark.services

CLIENTS, BUSY = 1500, 1000
# A small sample rounds up to whole allocator slabs: allow that much over the figure.
SAMPLE_SLACK = 1.25


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(ln for ln in f if ln.startswith("VmRSS:")).split()[1])


@pytest.fixture
def pod(postgres_server: PostgresServer) -> Iterator[PgBouncerPod]:
    pg = postgres_server
    pod = PgBouncerPod(pg, DatabaseCredentials(pg.user, pg.password))
    try:
        pod.server.start()
        yield pod
    finally:
        pod.close()


async def test_pgbouncer_memory_per_client(pod: PgBouncerPod) -> None:
    pg, pid = pod.postgres, pod.server.pid
    assert pid is not None
    gate = asyncio.Semaphore(32)  # logins are SCRAM-hashed: not all at once
    conns: list[asyncpg.Connection] = []

    async def login() -> None:
        async with gate:
            conns.append(await asyncpg.connect(
                host=LOOPBACK, port=pod.port, user=pg.user, password=pg.password,
                database=pg.database, statement_cache_size=0, timeout=60))

    try:
        await login()
        await conns[0].fetchval("SELECT 1")  # the pool and its first server connection
        await asyncio.sleep(1)
        base = _rss_kib(pid)
        await asyncio.gather(*(login() for _ in range(CLIENTS - 1)))
        await asyncio.sleep(1)
        idle = (_rss_kib(pid) - base) / CLIENTS
        before_busy = _rss_kib(pid)
        await asyncio.gather(*(c.fetchval("SELECT pg_sleep(0.05)") for c in conns[:BUSY]))
        busy = (_rss_kib(pid) - before_busy) / BUSY + idle
    finally:
        for conn in conns:
            conn.terminate()
    print(f"\nPgBouncer RSS: {base} KiB base, {idle:.2f} KiB per idle client, {busy:.2f} KiB per "
          f"client after a query ({CLIENTS} clients, {BUSY} busy)")
    assert base <= PGBOUNCER_BASE_MIB * 1024
    assert idle <= PGBOUNCER_IDLE_CLIENT_KIB * SAMPLE_SLACK
    assert busy <= PGBOUNCER_ACTIVE_CLIENT_KIB * SAMPLE_SLACK


def test_redis_bytes_per_rate_limit_key(redis_server: RedisServer) -> None:
    # A database of its own: other tests' keys stay untouched.
    client = redis.Redis(host=redis_server.host, port=redis_server.port, db=15)
    client.flushdb()
    script = client.script_load(SLIDING_WINDOW_LUA)
    before = int(client.info("memory")["used_memory"])  # server-wide, but nothing else runs
    clients = 20_000
    pipe = client.pipeline(transaction=False)
    for i in range(clients):
        # The key shapes the proxy uses: an IPv4 address, a user id, an API key id.
        keys = [f"rl:ip:10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", f"rl:user:user-{i:08d}",
                f"rl:key:{i:016x}"]
        pipe.evalsha(script, len(keys), *keys, 60, 1, len(keys), 1000, 10000, 100000)
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()
    keys = int(client.dbsize())
    per_key = (int(client.info("memory")["used_memory"]) - before) / keys
    client.flushdb()
    client.close()
    print(f"\nRedis: {per_key:.1f} bytes per rate-limit key ({keys} keys); "
          f"{REDIS_KEYS_PER_CLIENT} keys per client at most")
    assert keys == 3 * clients  # one current-window key per scope and client
    assert per_key <= REDIS_BYTES_PER_KEY
