"""Admin-port endpoints of one process: /health, /ready (the process, never its dependencies),
/stats and /metrics with each dependency's state, and the degraded answers while one is down."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import jwt
from aiohttp.test_utils import TestClient, TestServer
from tests.proxy.conftest import ProxyFactory, proxy_config
from tests.proxy.fakes import FakeBackend, free_port

from gpuproxy_proxy.auth.apikeys import generate_key
from gpuproxy_proxy.config import Secrets
from gpuproxy_proxy.metering.meter import USAGE_METER
from gpuproxy_proxy.observability.status import LocalSource, build_status_app
from gpuproxy_proxy.process.lifecycle import ProcessLifecycle
from gpuproxy_proxy.runtime import RUNTIME

JWT_SECRET = "status-test-secret-" + "x" * 32


async def _status(proxy: TestClient[Any, Any]) -> TestClient[Any, Any]:
    runtime = proxy.app[RUNTIME]
    runtime.serving = True  # what Worker.start does once the client port is open
    client: TestClient[Any, Any] = TestClient(TestServer(
        build_status_app([LocalSource(proxy.app)], ProcessLifecycle(runtime)), host="127.0.0.1"))
    await client.start_server()
    return client


async def _until_dependency(status: TestClient[Any, Any], name: str, up: bool) -> None:
    deadline = time.monotonic() + 30
    while (await (await status.get("/stats")).json())["dependencies"].get(name) is not up:
        assert time.monotonic() < deadline, f"{name} never reported {'up' if up else 'down'}"
        await asyncio.sleep(0.05)


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
        assert stats["connections_active"] == 1  # the test client's keep-alive connection
        assert stats["requests_in_flight"] == 0
        assert stats["workers"] == 1
        assert stats["backends"]["a"]["state"] == "healthy"
        assert stats["dependencies"] == {"backends": True}
        assert stats["ready"] is True
        metrics = await (await status.get("/metrics")).text()
        assert "gpuproxy_requests_total" in metrics
        assert 'gpuproxy_backend_healthy{backend="a"} 1.0' in metrics
        assert 'gpuproxy_dependency_up{dependency="backends"} 1.0' in metrics

        proxy.app[RUNTIME].draining = True
        ready = await status.get("/ready")
        assert ready.status == 503
        assert (await ready.json())["draining"] is True
        assert (await status.get("/health")).status == 200  # draining is not dying
    finally:
        await status.close()


async def test_no_backend_keeps_the_pod_ready_and_answers_503(
    make_proxy: ProxyFactory
) -> None:
    dead = FakeBackend("dead", port=free_port())
    proxy = await make_proxy(proxy_config(
        [dead], health_check={"interval_seconds": 0.05, "unhealthy_threshold": 1}))
    status = await _status(proxy)
    try:
        await _until_dependency(status, "backends", False)
        assert (await status.get("/ready")).status == 200
        metrics = await (await status.get("/metrics")).text()
        assert 'gpuproxy_dependency_up{dependency="backends"} 0.0' in metrics
        refused = await proxy.post("/v1/chat/completions", json={})
        assert refused.status == 503
        assert int(refused.headers["Retry-After"]) >= 1
        assert (await refused.json())["error"]["type"] == "no_backend_available"
    finally:
        await status.close()


async def test_database_down_degrades_api_keys_only(backends: list[FakeBackend],
                                                   make_proxy: ProxyFactory) -> None:
    backends.append(await FakeBackend("a").start())
    proxy = await make_proxy(proxy_config(
        backends, database={"host": "127.0.0.1", "port": free_port()},
        auth={"enabled": True}, metering={"enabled": True}), Secrets(jwt_secret=JWT_SECRET))
    status = await _status(proxy)
    try:
        await _until_dependency(status, "database", False)
        assert (await status.get("/ready")).status == 200
        # An API key cannot be checked: 503 with Retry-After, for that request only.
        missed = await proxy.post("/v1/chat/completions", json={},
                                  headers={"Authorization": f"Bearer {generate_key()}"})
        assert missed.status == 503
        assert missed.headers["Retry-After"] == "1"
        # JWT traffic does not need the database.
        token = jwt.encode({"sub": "u1", "exp": int(time.time()) + 600}, JWT_SECRET,
                           algorithm="HS256")
        served = await proxy.post("/v1/chat/completions", json={},
                                  headers={"Authorization": f"Bearer {token}"})
        assert served.status == 200
        # Usage records are kept for when the database returns.
        assert proxy.app[USAGE_METER].buffered == 2
        metrics = await (await status.get("/metrics")).text()
        assert 'gpuproxy_dependency_up{dependency="database"} 0.0' in metrics
    finally:
        await status.close()


async def test_redis_down_failing_closed_keeps_the_pod_ready(
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
        assert refused.headers["Retry-After"] == "1"
        await _until_dependency(status, "redis", False)
        assert (await status.get("/ready")).status == 200
    finally:
        await status.close()
