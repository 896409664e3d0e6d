"""Passive ejection (transport failures only, capped, half-open with backoff), active health
checks, and backend URLs without credentials."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import HttpUrl, ValidationError
from tests.proxy.conftest import ProxyFactory, proxy_config
from tests.proxy.fakes import FakeBackend

from gpuproxy_proxy.config import (
    BackendConfig,
    HealthCheckConfig,
    LoadBalancingConfig,
    ProxyConfig,
)
from gpuproxy_proxy.observability.metrics import ProxyMetrics
from gpuproxy_proxy.routing.backends import MAX_EJECTION_SECONDS, BackendPool, BackendState
from gpuproxy_proxy.runtime import RUNTIME


async def eventually(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def state_of(client: Any, name: str) -> str:
    runtime = client.app[RUNTIME]
    return str(runtime.pool.by_name[name].state(time.monotonic()))


def pool_of(count: int) -> BackendPool:
    metrics = ProxyMetrics()
    states = [BackendState(BackendConfig(name=f"b{i}", url=f"http://127.0.0.1:{i + 1}"), metrics)
              for i in range(count)]
    return BackendPool(states, LoadBalancingConfig(strategy="round_robin"))


def test_half_open_allows_a_single_probe() -> None:
    health = HealthCheckConfig(unhealthy_threshold=2, ejection_seconds=10)
    state = pool_of(2).backends[0]
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
    state.record_failure(later, health)  # probe failed: ejected again, for twice as long
    assert not state.available(later + 11)
    assert state.available(later + 21)
    state.acquire()
    state.abandon()  # a probe cancelled before any answer does not block the next one
    assert state.available(later + 21)
    state.acquire()
    state.release()
    state.record_success(12.0, 0.5)
    assert state.state(later + 21) == "healthy"
    assert state.consecutive_failures == 0


def test_5xx_answers_never_eject_a_backend() -> None:
    state = pool_of(3).backends[0]
    now = time.monotonic()
    for status in (500, 502, 503, 504) * 5:  # whatever a client can make the backend answer
        state.record_answer(status, 3.0, 0.5, now)
    assert state.state(now) == "healthy"
    assert state.consecutive_failures == 0
    assert state.ewma_ms is None  # a fast error is no latency sample
    state.record_answer(200, 8.0, 0.5, now)
    assert state.ewma_ms == 8.0
    assert state.last_success == now


def test_an_answer_of_any_status_ends_an_ejection() -> None:
    health = HealthCheckConfig(unhealthy_threshold=1, ejection_seconds=10)
    state = pool_of(2).backends[0]
    now = time.monotonic()
    state.record_failure(now, health)  # a transport failure: ejected
    assert state.state(now) == "ejected"
    state.acquire()  # the half-open probe
    state.release()
    state.record_answer(503, 2.0, 0.5, now + 11)  # it answered: the transport works again
    assert state.state(now + 11) == "healthy"
    assert state.ejections == 0


@pytest.mark.parametrize(("count", "most_ejected"), [(1, 0), (2, 1), (3, 1), (4, 2), (5, 2)])
def test_passive_ejection_takes_at_most_half_of_the_healthy_backends(
    count: int, most_ejected: int
) -> None:
    health = HealthCheckConfig(unhealthy_threshold=1, ejection_seconds=10)
    pool = pool_of(count)
    now = time.monotonic()
    for _ in range(3):
        for state in pool.backends:
            state.record_failure(now, health)
    ejected = [s for s in pool.backends if s.state(now) == "ejected"]
    assert len(ejected) == most_ejected
    assert pool.choose() is not None


def test_the_cap_counts_only_actively_healthy_backends() -> None:
    health = HealthCheckConfig(unhealthy_threshold=1, ejection_seconds=10)
    a, b, c, d = pool_of(4).backends
    for down in (c, d):  # failing their health checks: out of rotation anyway
        down.record_check(False, health, "HTTP 503")
    now = time.monotonic()
    a.record_failure(now, health)
    b.record_failure(now, health)
    assert a.state(now) == "ejected"
    assert b.state(now) == "healthy"  # the last actively healthy backend stays in


def test_choose_falls_back_to_ejected_backends_rather_than_none() -> None:
    health = HealthCheckConfig(unhealthy_threshold=1, ejection_seconds=10)
    pool = pool_of(2)
    a, b = pool.backends
    a.record_failure(time.monotonic(), health)
    assert a.state(time.monotonic()) == "ejected"
    b.record_check(False, health, "HTTP 503")  # the other one goes down afterwards
    assert pool.any_available()
    assert pool.choose() is a  # ejected, but the only one left: tried rather than a 503
    a.release()
    a.record_check(False, health, "HTTP 503")
    assert not pool.any_available()
    assert pool.choose() is None  # actively unhealthy backends are never the fallback


def test_failed_half_open_probes_back_off_exponentially_up_to_a_cap() -> None:
    health = HealthCheckConfig(unhealthy_threshold=1, ejection_seconds=10)
    state = pool_of(2).backends[0]
    now = time.monotonic()
    state.record_failure(now, health)
    periods = [state.ejected_until - now]
    for _ in range(8):
        now = state.ejected_until  # half-open: one probe, which fails
        state.acquire()
        state.release()
        state.record_failure(now, health)
        periods.append(state.ejected_until - now)
    assert periods == pytest.approx([10, 20, 40, 80, 160, MAX_EJECTION_SECONDS,
                                     MAX_EJECTION_SECONDS, MAX_EJECTION_SECONDS,
                                     MAX_EJECTION_SECONDS])
    state.acquire()
    state.release()
    state.record_success(5.0, 0.5, now)
    assert state.ejections == 0
    state.record_failure(now, health)  # a new streak starts from the configured period
    assert state.ejected_until - now == pytest.approx(10)


def test_a_longer_configured_ejection_is_not_cut_by_the_cap() -> None:
    health = HealthCheckConfig(unhealthy_threshold=1, ejection_seconds=600)
    state = pool_of(2).backends[0]
    state.record_failure(0.0, health)
    state.acquire()
    state.release()
    state.record_failure(600.0, health)
    assert state.ejected_until == pytest.approx(1200.0)


@pytest.mark.parametrize("url", [
    "http://user:secret@gpu-0:8000", "http://user@gpu-0:8000/v1", "https://:secret@gpu-0",
])
def test_backend_url_with_credentials_is_refused(url: str) -> None:
    with pytest.raises(ValidationError) as caught:
        ProxyConfig.model_validate({"backends": [{"name": "gpu-0", "url": url}]})
    (error,) = caught.value.errors()
    assert error["loc"] == ("backends", 0)
    assert "backend 'gpu-0': url must not contain credentials" in error["msg"]
    assert "user:pass@" in error["msg"]
    assert "secret" not in error["msg"]


@pytest.mark.parametrize(("url", "host"), [
    ("http://user:secret@10.0.0.1:8000/base", "10.0.0.1:8000"),
    ("http://u:p@[fd00::1]:8000", "[fd00::1]:8000"),
    ("https://gpu-0.svc", "gpu-0.svc"),
    ("http://gpu-0:80", "gpu-0"),
])
def test_host_header_never_carries_credentials(url: str, host: str) -> None:
    # model_construct skips validation: a config built some other way still must not leak.
    config = BackendConfig.model_construct(name="b", url=HttpUrl(url), weight=1,
                                           health_path="/health", labels={})
    assert BackendState(config, ProxyMetrics()).host_header == host


async def test_failing_backend_is_ejected_then_recovers(backends: list[FakeBackend],
                                                        make_proxy: ProxyFactory) -> None:
    bad = await FakeBackend("bad", mode="close").start()  # transport failures, not 5xx
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
