"""Admin-port endpoints of one process: /health, /ready (and what fails it), /stats, /metrics."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from tests.proxy.conftest import ProxyFactory, proxy_config
from tests.proxy.fakes import FakeBackend, free_port

from gpuproxy_proxy.runtime import RUNTIME
from gpuproxy_proxy.status import LocalSource, build_status_app


async def _status(proxy: TestClient[Any, Any]) -> TestClient[Any, Any]:
    client: TestClient[Any, Any] = TestClient(
        TestServer(build_status_app([LocalSource(proxy.app)]), host="127.0.0.1"))
    await client.start_server()
    return client


async def test_ready_stats_and_metrics(backends: list[FakeBackend],
                                       make_proxy: ProxyFactory) -> None:
    backends.append(await FakeBackend("a").start())
    proxy = await make_proxy(proxy_config(backends))
    status = await _status(proxy)
    try:
        assert (await status.get("/health")).status == 200
        assert (await status.get("/ready")).status == 200
        await proxy.post("/v1/chat/completions", json={})
        stats = await (await status.get("/stats")).json()
        assert stats["connections_active"] == 0  # the test server does not count connections
        assert stats["requests_in_flight"] == 0
        assert stats["workers"] == 1
        assert stats["backends"]["a"]["state"] == "healthy"
        metrics = await (await status.get("/metrics")).text()
        assert "gpuproxy_requests_total" in metrics
        assert 'gpuproxy_backend_healthy{backend="a"} 1.0' in metrics

        proxy.app[RUNTIME].draining = True
        ready = await status.get("/ready")
        assert ready.status == 503
        assert (await ready.json())["workers"][0]["not_draining"] is False
    finally:
        await status.close()


async def test_not_ready_without_an_available_backend(make_proxy: ProxyFactory) -> None:
    dead = FakeBackend("dead", port=free_port())
    proxy = await make_proxy(proxy_config(
        [dead], health_check={"interval_seconds": 0.05, "unhealthy_threshold": 1}))
    status = await _status(proxy)
    try:
        deadline = time.monotonic() + 30
        while (ready := await status.get("/ready")).status != 503:
            assert time.monotonic() < deadline, "still ready without a backend"
            await asyncio.sleep(0.05)
        body = await ready.json()
        assert ready.status == 503
        assert body["workers"][0]["backend_available"] is False
    finally:
        await status.close()


async def test_not_ready_when_database_is_down(backends: list[FakeBackend],
                                               make_proxy: ProxyFactory) -> None:
    backends.append(await FakeBackend("a").start())
    proxy = await make_proxy(proxy_config(
        backends, database={"host": "127.0.0.1", "port": free_port()}))
    status = await _status(proxy)
    try:
        ready = await status.get("/ready")
        assert ready.status == 503
        assert (await ready.json())["workers"][0]["database"] is False
        # The data path still works without the database.
        assert (await proxy.post("/v1/chat/completions", json={})).status == 200
    finally:
        await status.close()


async def test_not_ready_when_redis_is_down_and_failing_closed(
    backends: list[FakeBackend], make_proxy: ProxyFactory
) -> None:
    backends.append(await FakeBackend("a").start())
    proxy = await make_proxy(proxy_config(
        backends, redis={"url": f"redis://127.0.0.1:{free_port()}/0"},
        rate_limits={"enabled": True, "on_redis_failure": "closed"}))
    status = await _status(proxy)
    try:
        refused = await proxy.post("/v1/chat/completions", json={})
        assert refused.status == 503
        ready = await status.get("/ready")
        assert ready.status == 503
        assert (await ready.json())["workers"][0]["redis"] is False
    finally:
        await status.close()
