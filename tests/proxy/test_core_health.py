"""Passive ejection with half-open recovery, and active health checks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from tests.proxy.conftest import ProxyFactory, proxy_config
from tests.proxy.fakes import FakeBackend

from gpuproxy_proxy.config import BackendConfig, HealthCheckConfig
from gpuproxy_proxy.observability.metrics import ProxyMetrics
from gpuproxy_proxy.routing.backends import BackendState
from gpuproxy_proxy.runtime import RUNTIME


async def eventually(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def state_of(client: Any, name: str) -> str:
    runtime = client.app[RUNTIME]
    return str(runtime.pool.by_name[name].state(time.monotonic()))


def test_half_open_allows_a_single_probe() -> None:
    health = HealthCheckConfig(unhealthy_threshold=2, ejection_seconds=10)
    state = BackendState(BackendConfig(name="b", url="http://127.0.0.1:1"), ProxyMetrics())
    now = time.monotonic()
    state.record_failure(now, health)
    assert state.available(now)
    state.record_failure(now, health)
    assert not state.available(now)
    later = now + 11
    assert state.available(later)  # half-open
    state.acquire()
    assert state.probing
    assert not state.available(later)  # only one probe at a time
    state.release()
    state.record_failure(later, health)  # probe failed: ejected again for a full period
    assert not state.available(later + 5)
    assert state.available(later + 11)
    state.acquire()
    state.abandon()  # a probe cancelled before any answer does not block the next one
    assert state.available(later + 11)
    state.acquire()
    state.release()
    state.record_success(12.0, 0.5)
    assert state.state(later + 11) == "healthy"
    assert state.consecutive_failures == 0


async def test_failing_backend_is_ejected_then_recovers(backends: list[FakeBackend],
                                                        make_proxy: ProxyFactory) -> None:
    bad = await FakeBackend("bad", mode="fail").start()
    good = await FakeBackend("good").start()
    backends += [bad, good]
    # The ejection must outlast the checks made while ejected (10 in-process requests), also on
    # a loaded machine: 3 s, not a fraction of a second.
    client = await make_proxy(proxy_config(
        backends, health_check={"unhealthy_threshold": 2, "ejection_seconds": 3.0,
                                "interval_seconds": 30}))
    for _ in range(4):  # round robin: bad fails twice and is ejected
        await (await client.post("/v1/chat/completions", json={})).read()
    assert bad.hits == 2
    assert state_of(client, "bad") == "ejected"
    for _ in range(6):
        resp = await client.post("/v1/chat/completions", json={})
        assert resp.status == 200
    assert bad.hits == 2  # no traffic while ejected
    bad.mode = "ok"
    await eventually(lambda: state_of(client, "bad") == "half_open")
    seen = set()
    for _ in range(6):
        resp = await client.post("/v1/chat/completions", json={})
        seen.add((await resp.json())["backend"])
    assert seen == {"bad", "good"}
    assert state_of(client, "bad") == "healthy"


async def test_active_health_check_removes_and_restores_backend(
    backends: list[FakeBackend], make_proxy: ProxyFactory
) -> None:
    sick = await FakeBackend("sick").start()
    fine = await FakeBackend("fine").start()
    backends += [sick, fine]
    client = await make_proxy(proxy_config(
        backends, health_check={"interval_seconds": 0.05, "unhealthy_threshold": 2,
                                "healthy_threshold": 1}))
    sick.healthy = False
    await eventually(lambda: state_of(client, "sick") == "unhealthy")
    hits = sick.hits
    for _ in range(4):
        assert (await client.post("/v1/chat/completions", json={})).status == 200
    assert sick.hits == hits
    models = await (await client.get("/v1/models")).json()
    assert [m["owned_by"] for m in models["data"]] == ["fine"]
    sick.healthy = True
    await eventually(lambda: state_of(client, "sick") == "healthy")
    for _ in range(4):
        assert (await client.post("/v1/chat/completions", json={})).status == 200
    assert sick.hits == hits + 2
