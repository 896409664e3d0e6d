"""Retries before the first byte (routing/retry.py) and the admission queue
(routing/admission.py) through the in-process proxy, against small gated backends."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import generate_latest
from tests.proxy.conftest import ProxyFactory, proxy_config
from tests.proxy.fakes import FakeBackend

from gpuproxy_proxy.appkeys import METRICS
from gpuproxy_proxy.auth.principal import ANONYMOUS, Principal
from gpuproxy_proxy.config import ProxyConfig
from gpuproxy_proxy.observability.aggregate import merge_stats
from gpuproxy_proxy.observability.metrics import ProxyMetrics
from gpuproxy_proxy.observability.status import LocalSource
from gpuproxy_proxy.routing.admission import ADMISSION, AdmissionQueue, tenant_of
from gpuproxy_proxy.routing.signals import BackendSignals
from gpuproxy_proxy.runtime import RUNTIME

_DEADLINE = 30.0  # generous: the machine may be loaded


class Gated:
    """A backend that answers `status` at once, or (status 200) holds each request until the
    test lets it go; it records who sent what, in arrival order."""

    def __init__(self, name: str, status: int = 200, retry_after: str | None = None) -> None:
        self.name, self.status, self.retry_after = name, status, retry_after
        self.hold = status == 200
        self.arrived: list[str] = []  # X-Forwarded-For of each request
        self.waiting: list[asyncio.Future[None]] = []
        self.in_flight = self.max_in_flight = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> Gated:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        for fut in self.waiting:
            if not fut.done():
                fut.set_result(None)
        if self._runner is not None:
            await self._runner.cleanup()

    async def _health(self, _: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def _handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.arrived.append(request.headers.get("X-Forwarded-For", ""))
        if self.status != 200:
            headers = {"Retry-After": self.retry_after} if self.retry_after else None
            return web.json_response({"error": "busy"}, status=self.status, headers=headers)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.hold:
                fut = asyncio.get_running_loop().create_future()
                self.waiting.append(fut)
                await fut
        finally:
            self.in_flight -= 1
        return web.json_response({"backend": self.name})

    def release_one(self) -> bool:
        for fut in self.waiting:
            if not fut.done():
                fut.set_result(None)
                return True
        return False


@pytest.fixture
async def gated() -> AsyncIterator[Callable[..., Any]]:
    started: list[Gated] = []

    async def factory(name: str, **kwargs: Any) -> Gated:
        backend = await Gated(name, **kwargs).start()
        started.append(backend)
        return backend

    yield factory
    for backend in started:
        await backend.stop()


def _config(backends: list[Any], **overrides: Any) -> Any:
    fakes = [FakeBackend(b.name) for b in backends]
    return proxy_config(fakes, backends=[{"name": b.name, "url": b.url} for b in backends],
                          **overrides)


async def _until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + _DEADLINE
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def _metric(client: Any, line_start: str) -> float:
    text = generate_latest(client.server.app[METRICS].registry).decode()
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _admission(max_in_flight: int = 1, **extra: Any) -> dict[str, Any]:
    return {"enabled": True, "max_in_flight_per_backend": max_in_flight, **extra}


# --- retries -------------------------------------------------------------------------------
async def test_backend_503_is_retried_on_another(gated: Any, make_proxy: ProxyFactory) -> None:
    busy = await gated("busy", status=503)
    ok = await gated("ok")
    ok.hold = False
    client = await make_proxy(_config([busy, ok]))
    for _ in range(4):
        resp = await client.post("/v1/chat/completions", json={"q": 1})
        assert resp.status == 200
        assert (await resp.json())["backend"] == "ok"
    assert busy.arrived  # it was asked, refused, and the request went on
    assert _metric(client, 'gpuproxy_upstream_retries_total{reason="503"}') == len(busy.arrived)


async def test_429_everywhere_reaches_client_after_attempts(gated: Any,
                                                            make_proxy: ProxyFactory) -> None:
    refusing = [await gated(name, status=429) for name in ("a", "b", "c", "d")]
    client = await make_proxy(_config(refusing, upstream={"retry": {"max_attempts": 2}}))
    resp = await client.post("/v1/chat/completions", json={"q": 1})
    assert resp.status == 429
    assert await resp.json() == {"error": "busy"}  # the backend's own answer
    # The first attempt plus two retries, each on a backend not tried yet.
    assert sorted(len(b.arrived) for b in refusing) == [0, 1, 1, 1]


async def test_retries_stop_at_the_budget(gated: Any, make_proxy: ProxyFactory) -> None:
    busy = await gated("busy", status=503)
    ok = await gated("ok")
    ok.hold = False
    # No share of the traffic, and 0.1 retries a second over 10s: one retry in all.
    client = await make_proxy(_config([busy, ok], upstream={"retry": {
        "budget_ratio": 0.0, "min_per_second": 0.1, "window_seconds": 10}}))
    statuses = [(await client.post("/v1/chat/completions", json={})).status
                for _ in range(6)]
    # Every refusal reached the client but the one retried within the budget.
    assert statuses.count(503) == len(busy.arrived) - 1 >= 1, statuses
    assert _metric(client, "gpuproxy_upstream_retries_total") == 1
    assert _metric(client, "gpuproxy_upstream_retry_budget_exhausted_total") >= 1


async def test_retry_after_keeps_a_backend_out_for_a_while(gated: Any,
                                                          make_proxy: ProxyFactory) -> None:
    busy = await gated("busy", status=503, retry_after="60")
    ok = await gated("ok")
    ok.hold = False
    client = await make_proxy(_config([busy, ok]))
    for _ in range(6):
        assert (await client.post("/v1/chat/completions", json={})).status == 200
    assert len(busy.arrived) == 1  # penalized after its first refusal


# --- the admission queue -------------------------------------------------------------------
async def test_saturated_backends_queue_the_rest(gated: Any, make_proxy: ProxyFactory) -> None:
    a, b = await gated("a"), await gated("b")
    client = await make_proxy(_config([a, b], admission=_admission(1)))
    queue = client.server.app[ADMISSION]
    tasks = [asyncio.create_task(client.post("/v1/chat/completions", json={}))
             for _ in range(10)]
    await _until(lambda: len(a.arrived) + len(b.arrived) == 2 and queue.depth == 8,
                 "two running, eight queued")
    assert _metric(client, "gpuproxy_admission_queue_depth") == 8
    stats = await LocalSource(client.server.app).stats()
    assert stats["admission"]["queue_depth"] == 8
    assert merge_stats([stats, stats], False)["admission_queue_depth"] == 16
    while not all(t.done() for t in tasks):
        a.release_one() or b.release_one()
        await asyncio.sleep(0.01)
    assert [(await t).status for t in tasks] == [200] * 10
    assert a.max_in_flight == 1
    assert b.max_in_flight == 1
    assert len(a.arrived) + len(b.arrived) == 10
    assert _metric(client, "gpuproxy_admission_wait_seconds_count") == 8


async def test_later_tenant_is_not_starved_by_a_burst(gated: Any,
                                                      make_proxy: ProxyFactory) -> None:
    gpu = await gated("gpu")
    client = await make_proxy(_config([gpu], admission=_admission(1), rate_limits={
        "enabled": False, "trusted_proxies": ["127.0.0.1/32"]}))
    queue = client.server.app[ADMISSION]

    def send(tenant: str) -> asyncio.Task[Any]:
        return asyncio.create_task(client.post("/v1/chat/completions", json={},
                                               headers={"X-Forwarded-For": tenant}))

    tasks = [send("10.0.0.1") for _ in range(20)]
    await _until(lambda: len(gpu.arrived) == 1 and queue.depth == 19, "A's burst queued")
    tasks += [send("10.0.0.2") for _ in range(2)]
    await _until(lambda: queue.depth == 21, "B's requests queued")
    while not all(t.done() for t in tasks):
        gpu.release_one()
        await asyncio.sleep(0.01)
    assert [(await t).status for t in tasks] == [200] * len(tasks)
    order = gpu.arrived
    b_positions = [i for i, who in enumerate(order) if who.startswith("10.0.0.2")]
    assert len(b_positions) == 2, order
    assert max(b_positions) <= 5, order  # not behind A's other seventeen


async def test_queue_deadline_answers_503_with_retry_after(gated: Any,
                                                           make_proxy: ProxyFactory) -> None:
    gpu = await gated("gpu")
    client = await make_proxy(_config([gpu], admission=_admission(
        1, queue_timeout_seconds=0.3, retry_after_seconds=3)))
    parked = asyncio.create_task(client.post("/v1/chat/completions", json={}))
    await _until(lambda: len(gpu.arrived) == 1, "one request running")
    resp = await client.post("/v1/chat/completions", json={})
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "3"
    error = (await resp.json())["error"]
    assert error["type"] == "overloaded"
    assert error["request_id"] == resp.headers["X-Request-ID"]
    assert _metric(client, 'gpuproxy_admission_rejections_total{reason="deadline_pool"}') == 1
    gpu.release_one()
    assert (await parked).status == 200


async def test_tenant_over_its_share_gets_429(gated: Any, make_proxy: ProxyFactory) -> None:
    gpu = await gated("gpu")
    client = await make_proxy(_config([gpu], admission=_admission(
        1, queue_timeout_seconds=3.0), rate_limits={
            "enabled": False, "trusted_proxies": ["127.0.0.1/32"]}))
    queue = client.server.app[ADMISSION]
    parked = asyncio.create_task(client.post("/v1/chat/completions", json={}))
    await _until(lambda: len(gpu.arrived) == 1, "one request running")
    tasks = [asyncio.create_task(client.post("/v1/chat/completions", json={},
                                             headers={"X-Forwarded-For": who}))
             for who in ("10.0.0.1",) * 3 + ("10.0.0.2",)]
    await _until(lambda: queue.depth == 4, "four queued")
    statuses = [(await t).status for t in tasks]
    assert 429 in statuses[:3], statuses
    assert statuses[3] == 503, statuses
    gpu.release_one()
    await parked


async def test_full_queue_refuses_at_once(gated: Any, make_proxy: ProxyFactory) -> None:
    gpu = await gated("gpu")
    client = await make_proxy(_config([gpu], admission=_admission(1, max_queue=1)))
    queue = client.server.app[ADMISSION]
    parked = asyncio.create_task(client.post("/v1/chat/completions", json={}))
    await _until(lambda: len(gpu.arrived) == 1, "one request running")
    queued = asyncio.create_task(client.post("/v1/chat/completions", json={}))
    await _until(lambda: queue.depth == 1, "one queued")
    started = time.monotonic()
    resp = await client.post("/v1/chat/completions", json={})
    assert resp.status == 503
    assert "Retry-After" in resp.headers
    assert time.monotonic() - started < 5.0
    assert _metric(client, 'gpuproxy_admission_rejections_total{reason="queue_full"}') == 1
    gpu.release_one()
    assert (await parked).status == 200
    await _until(lambda: len(gpu.arrived) == 2, "the queued one admitted")
    gpu.release_one()
    assert (await queued).status == 200


async def test_client_gone_while_queued_leaves_the_queue(gated: Any,
                                                         make_proxy: ProxyFactory) -> None:
    gpu = await gated("gpu")
    client = await make_proxy(_config([gpu], admission=_admission(1, max_queue=1)))
    queue = client.server.app[ADMISSION]
    parked = asyncio.create_task(client.post("/v1/chat/completions", json={}))
    await _until(lambda: len(gpu.arrived) == 1, "one request running")
    leaving = asyncio.create_task(client.post("/v1/chat/completions", json={}))
    await _until(lambda: queue.depth == 1, "one queued")
    leaving.cancel()  # the client hangs up
    await _until(lambda: queue.depth == 0, "the queue emptied")
    staying = asyncio.create_task(client.post("/v1/chat/completions", json={}))
    await _until(lambda: queue.depth == 1, "its place taken")
    gpu.release_one()
    assert (await parked).status == 200
    await _until(lambda: len(gpu.arrived) == 2, "the staying one admitted")
    gpu.release_one()
    assert (await staying).status == 200
    assert len(gpu.arrived) == 2  # the one that left never reached the backend


def test_priority_header_is_honored_only_for_granted_principals() -> None:
    config = ProxyConfig.model_validate({"admission": {
        "enabled": True, "priorities": {"default": {}, "gold": {
            "weight": 4, "teams": ["search"], "api_keys": ["k-gold"]}}}})
    queue = AdmissionQueue(config.admission, ProxyMetrics(), workers=2)
    assert queue.per_backend == 32  # the pod's 64 split over two workers
    granted = Principal(kind="api_key", api_key_id="k-gold")
    team = Principal(kind="api_key", api_key_id="k-other", team="search")
    other = Principal(kind="api_key", api_key_id="k-other", team="ads")
    assert queue.priority_of(granted, "gold") == "gold"
    assert queue.priority_of(team, "gold") == "gold"
    assert queue.priority_of(other, "gold") == "default"  # no self-elevation
    assert queue.priority_of(ANONYMOUS, "gold") == "default"
    assert queue.priority_of(granted, "platinum") == "default"
    assert tenant_of(granted, "10.0.0.1") == "k:k-gold"
    assert tenant_of(ANONYMOUS, "10.0.0.1") == "ip:10.0.0.1"


def _engine(client: Any, name: str, **signals: float) -> None:
    """What the pod's scraper would hand this backend: fresh engine signals."""
    pool = client.server.app[RUNTIME].pool
    (backend,) = [b for b in pool.backends if b.name == name]
    backend.apply_signals(BackendSignals(scraped_at=time.monotonic(), engine="vllm", **signals))


async def test_engine_signals_saturate_a_backend_whatever_the_in_flight_count(
        gated: Any, make_proxy: ProxyFactory) -> None:
    """The Gateway API Inference Extension's thresholds: a backend whose KV cache is over 0.8
    or whose engine queue is over 5 takes nothing new; all such: requests wait in the queue."""
    a, b = await gated("a"), await gated("b")
    client = await make_proxy(_config([a, b], admission=_admission(64)))
    queue = client.server.app[ADMISSION]
    _engine(client, "a", kv_usage=0.95, waiting=0)
    _engine(client, "b", kv_usage=0.1, waiting=0)
    first = [asyncio.create_task(client.post("/v1/chat/completions", json={}))
             for _ in range(4)]
    await _until(lambda: len(b.arrived) == 4, "all four on the backend with room")
    assert a.arrived == []
    _engine(client, "b", kv_usage=0.1, waiting=9)  # now b's engine queue is long too
    queued = asyncio.create_task(client.post("/v1/chat/completions", json={}))
    await _until(lambda: queue.depth == 1, "queued while every engine is full")
    _engine(client, "a", kv_usage=0.2, waiting=0)  # a's cache drained
    b.release_one()  # a request ends: the queue looks again and finds a
    await _until(lambda: len(a.arrived) == 1, "the queued request went to a")
    a.release_one()
    while not all(t.done() for t in first):
        b.release_one()
        await asyncio.sleep(0.01)
    assert (await queued).status == 200
    assert [(await t).status for t in first] == [200] * 4


def test_engine_thresholds_reach_the_rendered_config() -> None:
    config = ProxyConfig.model_validate({"admission": {"max_kv_cache_usage": 0.9,
                                                       "max_engine_queue": None}})
    assert (config.admission.max_kv_cache_usage, config.admission.max_engine_queue) == (0.9, None)
    assert ProxyConfig().admission.max_kv_cache_usage == 0.8
    assert ProxyConfig().admission.max_engine_queue == 5
