"""API-key checks the cache cannot answer, against real PostgreSQL behind PgBouncer: a deadline
then 503, one query per key, a cap on pending misses, and the per-IP lookup quota charged before
the query. A table lock held from a direct PostgreSQL session makes every lookup wait."""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from tests.proxy.conftest import AdminApiFactory, ProxyFactory, proxy_config
from tests.proxy.fakes import FakeBackend

from gpuproxy_proxy.appkeys import METRICS
from gpuproxy_proxy.config import Secrets
from gpuproxy_proxy.runtime import RUNTIME

ADMIN = "lookup-admin-" + secrets.token_hex(16)  # the admin API needs 32+ characters
CHAT = "/v1/chat/completions"


def random_key() -> str:
    return "gpx_" + secrets.token_urlsafe(32)


def config(backends: list[FakeBackend], pgbouncer: Any, **sections: Any) -> Any:
    auth = {"enabled": True, **sections.pop("auth", {})}
    return proxy_config(
        backends, auth=auth,
        database={"host": pgbouncer.host, "port": pgbouncer.port,
                  "database": pgbouncer.database, "sslmode": "disable"},
        **sections)


def proxy_secrets(pgbouncer: Any) -> Secrets:
    return Secrets(admin_token=ADMIN, db_user=pgbouncer.user, db_password=pgbouncer.password)


async def wait_db(admin_api: TestClient[Any, Any]) -> None:
    deadline = time.monotonic() + 60
    while True:
        resp = await admin_api.get("/admin/keys", params={"limit": "1"},
                                   headers={"Authorization": f"Bearer {ADMIN}"})
        await resp.read()
        if resp.status == 200:
            return
        assert time.monotonic() < deadline, "the proxy never reached the database"
        await asyncio.sleep(0.1)


async def new_key(admin_api: TestClient[Any, Any]) -> str:
    resp = await admin_api.post("/admin/keys", json={"user_id": "u-" + secrets.token_hex(4)},
                                headers={"Authorization": f"Bearer {ADMIN}"})
    assert resp.status == 201, await resp.text()
    return str((await resp.json())["key"])


async def call(proxy: TestClient[Any, Any], key: str,
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], float]:
    started = time.monotonic()
    resp = await proxy.post(CHAT, json={}, headers={"Authorization": f"Bearer {key}",
                                                    **(headers or {})})
    await resp.read()
    return resp.status, dict(resp.headers), time.monotonic() - started


def lookups(proxy: TestClient[Any, Any], outcome: str) -> float:
    value = proxy.app[METRICS].registry.get_sample_value(
        "gpuproxy_api_key_lookups_total", {"outcome": outcome})
    return value or 0.0


@pytest.fixture
async def locked_keys(postgres_server: Any) -> AsyncIterator[asyncpg.Connection]:
    """A direct session that can lock api_keys (every lookup then waits on the lock)."""
    conn = await asyncpg.connect(postgres_server.dsn)
    try:
        yield conn
    finally:
        await conn.close()  # ends the transaction, releasing the lock


async def lock(conn: asyncpg.Connection) -> None:
    await conn.execute("BEGIN")
    await conn.execute("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE")


async def waiting_lookups(conn: asyncpg.Connection) -> int:
    """Queries waiting for our lock right now (only lookups touch api_keys meanwhile). Not
    pg_stat_activity: a query blocked while being parsed still shows the previous one's text."""
    count = await conn.fetchval(
        "SELECT count(*) FROM pg_locks WHERE relation = 'api_keys'::regclass AND NOT granted")
    return int(count)


async def test_lookup_waits_at_most_its_deadline_then_503_and_gives_the_connection_back(
    pgbouncer_server: Any, backends: list[FakeBackend], make_proxy: ProxyFactory,
    make_admin_api: AdminApiFactory,
    locked_keys: asyncpg.Connection,
) -> None:
    backends.append(await FakeBackend("gpu").start())
    proxy = await make_proxy(config(
        backends, pgbouncer_server, auth={"api_key_lookup_timeout_seconds": 1.0}),
        proxy_secrets(pgbouncer_server))
    proxy.app[RUNTIME].serving = True
    admin_api = await make_admin_api(proxy)
    await wait_db(admin_api)
    cached = await new_key(admin_api)
    assert (await call(proxy, cached))[0] == 200

    await lock(locked_keys)
    waiting = asyncio.create_task(call(proxy, random_key()))
    deadline = time.monotonic() + 30
    while not await waiting_lookups(locked_keys):
        assert time.monotonic() < deadline, "the lookup never reached PostgreSQL"
        await asyncio.sleep(0.05)
    status, headers, elapsed = await waiting
    # Before: the query waited for asyncpg's 10 s command timeout (PgBouncer's
    # query_wait_timeout in production, 120 s by default), holding its pool connection.
    assert (status, headers.get("Retry-After")) == (503, "1")
    assert 0.9 <= elapsed < 8, elapsed
    assert lookups(proxy, "timeout") == 1
    deadline = time.monotonic() + 30
    while await waiting_lookups(locked_keys):
        # The deadline cancelled the query in PostgreSQL too.
        assert time.monotonic() < deadline, "the timed-out query still waits in PostgreSQL"
        await asyncio.sleep(0.1)
    assert (await call(proxy, cached))[0] == 200  # cached keys need no query
    await locked_keys.execute("ROLLBACK")
    assert (await call(proxy, await new_key(admin_api)))[0] == 200


async def test_pending_misses_are_capped_and_one_query_serves_one_key(
    pgbouncer_server: Any, backends: list[FakeBackend], make_proxy: ProxyFactory,
    make_admin_api: AdminApiFactory,
    locked_keys: asyncpg.Connection,
) -> None:
    backends.append(await FakeBackend("gpu").start())
    timeout = 8.0
    proxy = await make_proxy(config(
        backends, pgbouncer_server,
        auth={"api_key_lookup_timeout_seconds": timeout, "api_key_max_pending_lookups": 4}),
        proxy_secrets(pgbouncer_server))
    proxy.app[RUNTIME].serving = True
    admin_api = await make_admin_api(proxy)
    await wait_db(admin_api)

    await lock(locked_keys)
    same = random_key()
    same_key = [asyncio.create_task(call(proxy, same)) for _ in range(10)]
    deadline = time.monotonic() + 30
    while await waiting_lookups(locked_keys) < 1:
        assert time.monotonic() < deadline, "the lookup never reached PostgreSQL"
        await asyncio.sleep(0.05)
    started = time.monotonic()
    distinct = await asyncio.gather(*(call(proxy, random_key()) for _ in range(20)))
    refused_at_once = [d for d in distinct if d[0] == 503 and d[2] < timeout / 2]
    # One pending query for the repeated key, three more for distinct ones, 17 refused.
    assert len(refused_at_once) == 17, [(d[0], round(d[2], 2)) for d in distinct]
    assert all(d[1].get("Retry-After") == "1" for d in distinct)
    assert time.monotonic() - started < timeout + 5
    assert lookups(proxy, "overloaded") == 17
    results = await asyncio.gather(*same_key)
    deadline = time.monotonic() + 30
    while await waiting_lookups(locked_keys):
        assert time.monotonic() < deadline, "queries past their deadline still wait"
        await asyncio.sleep(0.1)
    assert [r[0] for r in results] == [503] * 10
    assert lookups(proxy, "coalesced") == 9
    assert lookups(proxy, "timeout") == 4

    await locked_keys.execute("ROLLBACK")
    assert (await call(proxy, same))[0] == 401


async def test_failed_credentials_are_charged_to_the_ip_before_the_lookup(
    pgbouncer_server: Any, redis_server: Any, backends: list[FakeBackend],
    make_proxy: ProxyFactory, make_admin_api: AdminApiFactory, locked_keys: asyncpg.Connection,
) -> None:
    backends.append(await FakeBackend("gpu").start())
    proxy = await make_proxy(config(
        backends, pgbouncer_server,
        auth={"api_key_lookup_timeout_seconds": 6.0},
        rate_limits={"enabled": True, "per_ip": 3, "trusted_proxies": ["127.0.0.0/8"]},
        redis={"url": redis_server.url, "socket_timeout_seconds": 10}),
        proxy_secrets(pgbouncer_server))
    proxy.app[RUNTIME].serving = True
    admin_api = await make_admin_api(proxy)
    await wait_db(admin_api)
    # A client address of this test alone, so Redis counters of other tests do not count.
    client = {"X-Forwarded-For": f"198.18.{random.randrange(256)}.{random.randrange(1, 255)}"}

    await lock(locked_keys)
    pending = asyncio.gather(*(call(proxy, random_key(), client) for _ in range(20)))
    deadline = time.monotonic() + 30
    while (queries := await waiting_lookups(locked_keys)) < 3:
        assert time.monotonic() < deadline, f"{queries} lookups reached PostgreSQL, not 3"
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # time for a fourth query to show up, if one were made
    assert await waiting_lookups(locked_keys) == 3
    answers = await pending
    statuses = sorted(a[0] for a in answers)
    # Before: all 20 became queries (as many at once as the query slots allow), and the IP
    # was charged only after each 401, so its quota never stopped a lookup.
    assert statuses == [429] * 17 + [503] * 3, statuses
    assert all(a[1].get("Retry-After") for a in answers)
    assert all(a[2] < 3 for a in answers if a[0] == 429)  # never waited for the database
    assert lookups(proxy, "timeout") == 3
    registry = proxy.app[METRICS].registry
    assert registry.get_sample_value("gpuproxy_ratelimit_rejections_total",
                                     {"scope": "key_lookup"}) == 17
    await locked_keys.execute("ROLLBACK")
    # Another address still gets its keys checked.
    other = {"X-Forwarded-For": f"198.19.{random.randrange(256)}.{random.randrange(1, 255)}"}
    assert (await call(proxy, random_key(), other))[0] == 401
