"""A PgBouncer outage under a running proxy: the pod stays ready, the outage shows as
`gpuproxy_dependency_up{dependency="database"} 0`, only API-key lookups that miss the cache get
503, JWT and cached keys are served, and usage records are kept and written afterwards."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import jwt
from aiohttp.test_utils import TestClient, TestServer
from tests.proxy.conftest import AdminApiFactory, ProxyFactory, proxy_config
from tests.proxy.fakes import FakeBackend

from gpuproxy_proxy.config import Secrets
from gpuproxy_proxy.metering.meter import USAGE_METER
from gpuproxy_proxy.observability.status import LocalSource, build_status_app
from gpuproxy_proxy.process.lifecycle import ProcessLifecycle
from gpuproxy_proxy.runtime import RUNTIME

JWT_SECRET = "degraded-test-secret-" + "d" * 32
ADMIN = "degraded-admin-token-" + "a" * 32
CHAT = "/v1/chat/completions"


async def _until(check: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def test_pgbouncer_outage_degrades_only_what_needs_the_database(
    pgbouncer_server: Any, backends: list[FakeBackend], make_proxy: ProxyFactory,
    make_admin_api: AdminApiFactory,
) -> None:
    backends.append(await FakeBackend("gpu").start())
    proxy = await make_proxy(proxy_config(
        backends, auth={"enabled": True},
        database={"host": pgbouncer_server.host, "port": pgbouncer_server.port,
                  "database": pgbouncer_server.database, "sslmode": "disable"},
        metering={"enabled": True, "flush_interval_seconds": 0.1}),
        Secrets(jwt_secret=JWT_SECRET, admin_token=ADMIN, db_user=pgbouncer_server.user,
                db_password=pgbouncer_server.password))
    runtime = proxy.app[RUNTIME]
    runtime.serving = True
    status: TestClient[Any, Any] = TestClient(TestServer(
        build_status_app([LocalSource(proxy.app)], ProcessLifecycle(runtime)), host="127.0.0.1"))
    await status.start_server()
    admin_api = await make_admin_api(proxy)

    async def database_up(up: bool) -> bool:
        stats = await (await status.get("/stats")).json()
        return bool(stats["dependencies"]["database"] is up)

    async def call(token: str) -> tuple[int, dict[str, str]]:
        resp = await proxy.post(CHAT, json={}, headers={"Authorization": f"Bearer {token}"})
        await resp.read()
        return resp.status, dict(resp.headers)

    try:
        await _until(lambda: database_up(True), "the database never came up")
        keys = []
        for user in ("cached", "uncached"):
            resp = await admin_api.post("/admin/keys", json={"user_id": user},
                                    headers={"Authorization": f"Bearer {ADMIN}"})
            assert resp.status == 201
            keys.append((await resp.json())["key"])
        assert (await call(keys[0]))[0] == 200  # now in the key cache
        token = jwt.encode({"sub": "u1", "exp": int(time.time()) + 600}, JWT_SECRET,
                           algorithm="HS256")
        meter = proxy.app[USAGE_METER]
        written = meter.written

        pgbouncer_server.stop()
        await _until(lambda: database_up(False), "the outage was never reported")
        assert (await status.get("/ready")).status == 200
        metrics = await (await status.get("/metrics")).text()
        assert 'gpuproxy_dependency_up{dependency="database"} 0.0' in metrics
        started = time.monotonic()
        code, headers = await call(keys[1])
        assert (code, headers["Retry-After"]) == (503, "1")
        assert time.monotonic() - started < 5  # answered at once, not after a timeout
        assert (await call(keys[0]))[0] == 200
        assert (await call(token))[0] == 200
        assert meter.buffered >= 3

        pgbouncer_server.start()
        await _until(lambda: database_up(True), "the database never came back")
        assert (await call(keys[1]))[0] == 200
        await _until(lambda: _done(meter), "the kept usage records were not written")
        assert meter.written >= written + 4
        assert meter.dropped == 0
    finally:
        await status.close()


async def _done(meter: Any) -> bool:
    return bool(meter.buffered == 0)
