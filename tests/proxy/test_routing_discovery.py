"""Issue 13 item 1: backends discovered from EndpointSlices (a fake API server serving LIST and a
streaming WATCH) join the static ones within 5 s, terminating or removed ones take no new
requests within 5 s while an in-flight stream finishes, and a 410 Gone makes the proxy list again.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from tests.proxy.conftest import ProxyFactory, proxy_config
from tests.proxy.fakes import FakeBackend, free_port
from tests.proxy.procs import ProxyProcess, start_proxy, write_config

from gpuproxy_proxy.config import BackendConfig, DiscoveryConfig, DiscoverySourceConfig
from gpuproxy_proxy.routing.discovery import DiscoveryWatcher, backend_name, slice_backends
from gpuproxy_proxy.runtime import RUNTIME

NAMESPACE = "team-a"
SERVICE = "vllm"
BOUND = 5.0  # the promise: seconds from an EndpointSlice change to routing


def endpoint_slice(name: str, port: int, ready: bool = True, terminating: bool = False,
                   service: str = SERVICE) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": NAMESPACE,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["127.0.0.1"],
                       "conditions": {"ready": ready, "serving": True,
                                      "terminating": terminating}}],
    }


class FakeApiServer:
    """EndpointSlices of one namespace: LIST with a resourceVersion, WATCH as JSON lines."""

    def __init__(self) -> None:
        self.slices: dict[str, dict[str, Any]] = {}
        self.rv = 100
        self.events: list[tuple[int, dict[str, Any]]] = []
        self.changed = asyncio.Condition()
        self.lists = 0
        self.watches = 0
        self.selectors: list[str] = []
        self.tokens: list[str] = []
        self.expired_before = 0  # watches from an older resourceVersion get a 410
        self.failures = 0  # the next requests answered 500 (an API server outage)
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakeApiServer:
        app = web.Application()
        app.router.add_get(
            f"/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices", self._get)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def put(self, item: dict[str, Any], kind: str | None = None,
                  silent: bool = False) -> None:
        """Add, change or (kind DELETED) remove a slice; silent: no watch event (missed)."""
        self.rv += 1
        obj = json.loads(json.dumps(item))
        obj["metadata"]["resourceVersion"] = str(self.rv)
        name = obj["metadata"]["name"]
        kind = kind or ("MODIFIED" if name in self.slices else "ADDED")
        if kind == "DELETED":
            self.slices.pop(name, None)
        else:
            self.slices[name] = obj
        if not silent:
            self.events.append((self.rv, {"type": kind, "object": obj}))
        async with self.changed:
            self.changed.notify_all()

    async def expire(self) -> None:
        """Compaction: every open watch ends with an ERROR 410, older versions are gone."""
        self.expired_before = self.rv + 1
        self.rv += 1
        self.events.append((self.rv, {"type": "ERROR", "object": {
            "kind": "Status", "code": 410, "reason": "Expired", "message": "too old"}}))
        async with self.changed:
            self.changed.notify_all()

    async def _get(self, request: web.Request) -> web.StreamResponse:
        self.tokens.append(request.headers.get("Authorization", ""))
        if self.failures:
            self.failures -= 1
            return web.json_response({"kind": "Status", "code": 500}, status=500)
        selector = request.query.get("labelSelector", "")
        self.selectors.append(selector)
        key, _, value = selector.partition("=")
        matching = [s for s in self.slices.values() if s["metadata"]["labels"].get(key) == value]
        if request.query.get("watch") not in ("1", "true"):
            self.lists += 1
            return web.json_response({"kind": "EndpointSliceList",
                                      "metadata": {"resourceVersion": str(self.rv)},
                                      "items": matching})
        self.watches += 1
        assert request.query["allowWatchBookmarks"] == "true"
        assert int(request.query["timeoutSeconds"]) > 0
        since = int(request.query["resourceVersion"])
        if since < self.expired_before:
            return web.json_response({"kind": "Status", "code": 410}, status=410)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        while True:
            for rv, event in self.events:
                if rv > since and (event["type"] == "ERROR" or event["object"]["metadata"]
                                   ["labels"].get(key) == value):
                    await resp.write(json.dumps(event).encode() + b"\n")
                    if event["type"] == "ERROR":
                        return resp
                since = max(since, rv)
            async with self.changed:
                await self.changed.wait_for(lambda s=since: self.rv > s)  # type: ignore[misc]


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    server = await FakeApiServer().start()
    yield server
    await server.stop()


def name_of(fake: FakeBackend) -> str:
    return backend_name("pool", "127.0.0.1", fake.port)


async def discovery_proxy(tmp_path: Path, api: FakeApiServer, static: FakeBackend | None,
                          workers: int) -> ProxyProcess:
    token = tmp_path / "token"
    token.write_text("sa-token-1\n", encoding="utf-8")
    config = proxy_config(
        [static] if static else [], workers=workers,
        listen={"host": "127.0.0.1", "port": free_port(), "admin_port": free_port()},
        discovery={"namespace": NAMESPACE,
                   "api": {"url": api.url, "token_file": str(token),
                           "ca_file": str(tmp_path / "none.crt")},
                   "sources": [{"name": "pool", "service": SERVICE, "port": "http"}]})
    return await start_proxy(tmp_path / "proxy.yaml", config, tmp_path / "proxy.log")


async def chat(http: aiohttp.ClientSession, proxy: ProxyProcess) -> str:
    async with http.post(proxy.url + "/v1/chat/completions", json={"model": "fake-model"},
                         timeout=aiohttp.ClientTimeout(total=30)) as resp:
        assert resp.status == 200, await resp.text()
        return str((await resp.json())["backend"])


async def until_routed(http: aiohttp.ClientSession, proxy: ProxyProcess, fake: FakeBackend,
                       since: float) -> float:
    """Send requests until one reaches `fake`; seconds from `since`."""
    before = fake.hits
    deadline = time.monotonic() + 60
    while fake.hits == before:
        assert time.monotonic() < deadline, f"{fake.name} never got traffic"
        await chat(http, proxy)
        await asyncio.sleep(0.02)
    return time.monotonic() - since


async def until_gone(proxy: ProxyProcess, fake: FakeBackend, since: float) -> float:
    """Every worker's pool has dropped `fake`; seconds from `since`."""
    await proxy.wait_for(lambda s: len(s["per_worker"]) == s["workers_expected"]
                         and name_of(fake) not in s["backends"]
                         if "per_worker" in s else name_of(fake) not in s["backends"],
                         f"{fake.name} stayed in the pool", timeout=60)
    return time.monotonic() - since


@pytest.mark.parametrize("workers", [1, 2])
async def test_discovered_backends_follow_endpoint_slices(
        tmp_path: Path, api: FakeApiServer, workers: int) -> None:
    gate = asyncio.Event()
    static, a, b, c = [await FakeBackend(n).start() for n in ("static", "a", "b", "c")]
    b.gate = gate
    await api.put(endpoint_slice("vllm-a", a.port))
    await api.put(endpoint_slice("other", c.port, service="not-vllm"))  # another Service
    proxy = await discovery_proxy(tmp_path, api, static, workers)
    try:
        async with aiohttp.ClientSession() as http:
            await until_routed(http, proxy, a, time.monotonic())
            assert api.selectors[0] == f"kubernetes.io/service-name={SERVICE}"
            assert api.tokens[0] == "Bearer sa-token-1"

            # A new ready endpoint receives traffic within the bound.
            added = time.monotonic()
            await api.put(endpoint_slice("vllm-b", b.port))
            assert await until_routed(http, proxy, b, added) < BOUND

            # A stream held open on b...
            stream = None
            deadline = time.monotonic() + 60
            while stream is None:
                assert time.monotonic() < deadline, "no stream landed on b"
                resp = await http.post(proxy.url + "/v1/chat/completions",
                                       json={"model": "fake-model", "stream": True})
                first = await resp.content.readline()
                if b'"b"' in first:
                    stream = resp
                else:
                    await resp.read()
                    resp.release()
            # ...goes on after b turns terminating, which takes no new requests.
            drained = time.monotonic()
            await api.put(endpoint_slice("vllm-b", b.port, ready=False, terminating=True))
            assert await until_gone(proxy, b, drained) < BOUND
            hits = b.hits
            for _ in range(10):
                assert await chat(http, proxy) != "b"
            assert b.hits == hits
            gate.set()
            rest = await stream.read()
            assert b"[DONE]" in rest
            stream.release()

            # A removed slice: its endpoint stops receiving requests.
            removed = time.monotonic()
            await api.put(endpoint_slice("vllm-a", a.port), kind="DELETED")
            assert await until_gone(proxy, a, removed) < BOUND
            hits = a.hits
            for _ in range(10):
                assert await chat(http, proxy) == "static"  # the static backend stays
            assert a.hits == hits
            assert c.hits == 0  # another Service's endpoints never join

            # 410 Gone: the proxy lists again (with the rotated token) and sees what it missed.
            lists = api.lists
            (tmp_path / "token").write_text("sa-token-2\n", encoding="utf-8")  # rotated
            await api.put(endpoint_slice("vllm-c", c.port), silent=True)
            await api.expire()
            await until_routed(http, proxy, c, time.monotonic())
            assert api.lists > lists
            assert api.tokens[-1] == "Bearer sa-token-2"  # re-read, not cached at start
    finally:
        await proxy.stop()
        for fake in (static, a, b, c):
            await fake.stop()


async def test_discovered_backends_alone_without_static_ones(
        tmp_path: Path, api: FakeApiServer) -> None:
    fake = await FakeBackend("only").start()
    await api.put(endpoint_slice("vllm-only", fake.port))
    proxy = await discovery_proxy(tmp_path, api, None, workers=1)
    try:
        # Until the first list lands there is no backend at all (503, Retry-After).
        await proxy.wait_for(lambda s: name_of(fake) in s["backends"], "never discovered")
        async with aiohttp.ClientSession() as http:
            await until_routed(http, proxy, fake, time.monotonic())
    finally:
        await proxy.stop()
        await fake.stop()


async def test_an_api_outage_keeps_the_last_backends_and_recovers(
        tmp_path: Path, api: FakeApiServer) -> None:
    published: list[list[BackendConfig]] = []
    config = DiscoveryConfig.model_validate({
        "namespace": NAMESPACE, "sources": [{"name": "pool", "service": SERVICE}],
        "api": {"url": api.url, "token_file": str(tmp_path / "absent")}})
    await api.put(endpoint_slice("vllm-a", 8001))
    task = asyncio.create_task(DiscoveryWatcher(config, published.append).run())

    async def until(check: Any, what: str) -> None:
        deadline = time.monotonic() + 60
        while not check():
            assert not task.done(), task
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.02)

    try:
        await until(lambda: published and len(published[-1]) == 1, "first list not published")
        assert api.tokens[0] == ""  # no token file: no Authorization header
        api.failures = 3
        await api.expire()  # the watch ends (410); the next list and retries fail (500)
        await until(lambda: api.failures == 0, "never retried")
        await api.put(endpoint_slice("vllm-b", 8002))
        await until(lambda: len(published[-1]) == 2, "never recovered")
        assert all(published), "an outage emptied the backends"
        assert [b.name for b in published[-1]] == ["pool-127-0-0-1-8001", "pool-127-0-0-1-8002"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_slice_endpoints_ready_only_and_named_deterministically() -> None:
    source = DiscoverySourceConfig(name="pool", service="vllm", port="http")
    item = endpoint_slice("s", 8000)
    item["endpoints"] += [
        {"addresses": ["10.0.0.2"], "conditions": {"ready": False}},
        {"addresses": ["10.0.0.3"], "conditions": {"ready": False, "serving": True,
                                                   "terminating": True}},
        {"addresses": ["10.0.0.4"], "conditions": {}},  # unknown: ready, per the API
        {"addresses": ["fd00::5"], "conditions": {"ready": True}},
    ]
    found = slice_backends(item, source)
    assert [b.name for b in found] == ["pool-127-0-0-1-8000", "pool-10-0-0-4-8000",
                                       "pool-fd00-5-8000"]
    assert str(found[2].url) == "http://[fd00::5]:8000/"
    assert slice_backends(item, source.model_copy(update={"port": "grpc"})) == []
    assert slice_backends(item, source.model_copy(update={"port": 9000}))[0].name \
        == "pool-127-0-0-1-9000"
    with pytest.raises(ValueError, match="not both"):
        DiscoverySourceConfig(name="x", service="a", selector="app=b")
    assert DiscoverySourceConfig(name="x", selector="app=b").label_selector == "app=b"


async def test_a_config_reload_keeps_the_discovered_backends(
        tmp_path: Path, api: FakeApiServer, make_proxy: ProxyFactory) -> None:
    static = await FakeBackend("static").start()
    try:
        await api.put(endpoint_slice("vllm-a", 8001))
        discovery = {"namespace": NAMESPACE, "sources": [{"name": "pool", "service": SERVICE}],
                     "api": {"url": api.url, "token_file": str(tmp_path / "absent")}}
        first = proxy_config([static], discovery=discovery, reload={"interval_seconds": 0.05})
        path = tmp_path / "config.yaml"
        write_config(path, first)
        client = await make_proxy(first, config_path=path)
        runtime = client.app[RUNTIME]
        deadline = time.monotonic() + 60
        while "pool-127-0-0-1-8001" not in runtime.pool.by_name:
            assert time.monotonic() < deadline, "never discovered"
            await asyncio.sleep(0.02)
        write_config(path, proxy_config([static], discovery=discovery,
                                        reload={"interval_seconds": 0.05},
                                        load_balancing={"strategy": "least_connections"}))
        while runtime.generation < 2:
            assert time.monotonic() < deadline, "never reloaded"
            await asyncio.sleep(0.02)
        assert sorted(runtime.pool.by_name) == ["pool-127-0-0-1-8001", "static"]
    finally:
        await static.stop()
