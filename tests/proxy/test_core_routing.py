"""Forwarding through the real app: strategies, streaming, errors, retries, /v1/models."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest
from prometheus_client import generate_latest
from tests.proxy.conftest import AdminApiFactory, ProxyFactory, proxy_config
from tests.proxy.fakes import FakeBackend, RecordingMeter, free_port

from gpuproxy_proxy.appkeys import METRICS
from gpuproxy_proxy.config import Secrets
from gpuproxy_proxy.routes import PIPELINE


async def _backend(backends: list[FakeBackend], name: str, **kwargs: Any) -> FakeBackend:
    backend = await FakeBackend(name, **kwargs).start()
    backends.append(backend)
    return backend


async def _error(resp: Any) -> dict[str, Any]:
    """The JSON error of `resp`, which carries the same request id as its X-Request-ID."""
    error: dict[str, Any] = (await resp.json())["error"]
    assert error["request_id"], (resp.status, error)
    assert error["request_id"] == resp.headers["X-Request-ID"], (resp.status, error)
    return error


async def _spread(client: Any, count: int) -> Counter[str]:
    seen: Counter[str] = Counter()
    for _ in range(count):
        resp = await client.post("/v1/chat/completions", json={"q": 1})
        assert resp.status == 200
        seen[(await resp.json())["backend"]] += 1
    return seen


async def test_round_robin_spreads_evenly(backends: list[FakeBackend],
                                          make_proxy: ProxyFactory) -> None:
    for name in ("a", "b", "c"):
        await _backend(backends, name)
    client = await make_proxy(proxy_config(backends))
    assert await _spread(client, 30) == {"a": 10, "b": 10, "c": 10}


async def test_weighted_round_robin_follows_weights(backends: list[FakeBackend],
                                                    make_proxy: ProxyFactory) -> None:
    a, b = await _backend(backends, "a"), await _backend(backends, "b")
    config = proxy_config(backends, backends=[{"name": "a", "url": a.url, "weight": 3},
                                              {"name": "b", "url": b.url, "weight": 1}],
                          load_balancing={"strategy": "weighted_round_robin"})
    client = await make_proxy(config)
    assert await _spread(client, 40) == {"a": 30, "b": 10}


async def test_least_connections_avoids_busy_backend(backends: list[FakeBackend],
                                                     make_proxy: ProxyFactory) -> None:
    gate = asyncio.Event()
    busy = await _backend(backends, "busy", gate=gate)
    await _backend(backends, "free")
    client = await make_proxy(proxy_config(
        backends, load_balancing={"strategy": "least_connections"}))
    # Park streams on whichever backend gets them; the gated ones stay in flight.
    streams = [await client.post("/v1/chat/completions", json={"stream": True})
               for _ in range(2)]
    assert busy.hits == 1  # one stream each (tie broken round-robin)
    seen = await _spread(client, 6)
    # The free backend's stream finished; the busy one still has one in flight.
    assert seen == {"free": 6}
    gate.set()
    for stream in streams:
        await stream.read()


async def test_least_response_time_prefers_fast_backend(backends: list[FakeBackend],
                                                        make_proxy: ProxyFactory) -> None:
    await _backend(backends, "fast")
    # Far slower than any stall a loaded machine adds to "fast", so the EWMA never flips.
    await _backend(backends, "slow", mode="slow", delay=1.0)
    client = await make_proxy(proxy_config(
        backends, load_balancing={"strategy": "least_response_time", "ewma_alpha": 0.5}))
    seen = await _spread(client, 20)
    assert seen["slow"] <= 2  # only its first (untested) try, then the EWMA steers away
    assert seen["fast"] >= 18


async def test_equal_weighted_reaches_every_backend(backends: list[FakeBackend],
                                                    make_proxy: ProxyFactory) -> None:
    for name in ("a", "b"):
        await _backend(backends, name)
    client = await make_proxy(proxy_config(
        backends, load_balancing={"strategy": "equal_weighted"}))
    seen = await _spread(client, 60)
    assert seen["a"] > 10
    assert seen["b"] > 10


async def test_stream_chunks_arrive_before_upstream_finishes(
    backends: list[FakeBackend], make_proxy: ProxyFactory
) -> None:
    gate = asyncio.Event()
    await _backend(backends, "s", gate=gate, chunks=3)
    client = await make_proxy(proxy_config(backends))
    resp = await client.post("/v1/chat/completions", json={"stream": True})
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    # The backend is blocked after its first event: it can only reach us if not buffered.
    first = await asyncio.wait_for(resp.content.readline(), timeout=30)
    assert first.startswith(b"data: ")
    assert b'"t0"' in first
    assert not gate.is_set()
    gate.set()
    rest = await resp.read()
    assert rest.rstrip().endswith(b"data: [DONE]")


async def test_usage_tokens_reach_the_meter(backends: list[FakeBackend],
                                            make_proxy: ProxyFactory) -> None:
    await _backend(backends, "u", chunks=4)
    client = await make_proxy(proxy_config(backends))
    meter = RecordingMeter()
    pipeline = client.app[PIPELINE]
    pipeline.meter = meter
    pipeline.metering_on = True
    await (await client.post("/v1/chat/completions", json={"q": 1})).read()
    await (await client.post("/v1/chat/completions", json={"stream": True})).read()
    plain, stream = meter.records
    assert (plain.prompt_tokens, plain.completion_tokens, plain.total_tokens) == (7, 3, 10)
    assert (stream.prompt_tokens, stream.completion_tokens, stream.total_tokens) == (5, 4, 9)
    assert plain.backend == "u"
    assert plain.route == "chat_completions"
    assert plain.status == 200
    assert plain.bytes_in == len(b'{"q": 1}')
    assert stream.bytes_out > 0


async def test_body_limit_gives_413_json(backends: list[FakeBackend],
                                         make_proxy: ProxyFactory) -> None:
    b = await _backend(backends, "a")
    client = await make_proxy(proxy_config(backends, limits={"max_body_bytes": 1024}))
    resp = await client.post("/v1/chat/completions", data=b"x" * 4096)
    assert resp.status == 413
    error = await _error(resp)
    assert error["type"] == "request_too_large"
    # What the user sets, not the proxy's internal config key.
    assert "spec.proxy.maxBodyBytes (1024 bytes)" in error["message"]
    assert b.hits == 0


async def test_chunked_body_over_limit_gives_413(backends: list[FakeBackend],
                                                 make_proxy: ProxyFactory) -> None:
    await _backend(backends, "a")
    client = await make_proxy(proxy_config(backends, limits={"max_body_bytes": 1024}))

    async def gen() -> Any:
        for _ in range(8):
            yield b"y" * 512

    resp = await client.post("/v1/completions", data=gen())
    assert resp.status == 413
    assert "spec.proxy.maxBodyBytes" in (await _error(resp))["message"]


async def test_upstream_failure_gives_502_json(make_proxy: ProxyFactory) -> None:
    dead = FakeBackend("dead", port=free_port())  # never started: connection refused
    client = await make_proxy(proxy_config([dead]))
    resp = await client.post("/v1/chat/completions", json={})
    assert resp.status == 502
    error = (await resp.json())["error"]
    assert error["type"] == "upstream_unavailable"
    assert "dead" in error["message"]
    await _error(resp)


async def test_upstream_broken_response_gives_502(backends: list[FakeBackend],
                                                  make_proxy: ProxyFactory) -> None:
    await _backend(backends, "closer", mode="close")
    client = await make_proxy(proxy_config(backends))
    resp = await client.post("/v1/chat/completions", json={}, headers={"X-Request-ID": "rid-1"})
    assert resp.status == 502
    body = await resp.json()
    assert body["error"]["type"] == "upstream_error"
    assert body["error"]["request_id"] == "rid-1"


async def test_read_timeout_gives_504_json(backends: list[FakeBackend],
                                           make_proxy: ProxyFactory) -> None:
    await _backend(backends, "hang", mode="hang")
    client = await make_proxy(proxy_config(backends, upstream={"read_timeout_seconds": 0.3}))
    started = time.monotonic()
    resp = await client.post("/v1/chat/completions", json={})
    assert resp.status == 504
    assert (await _error(resp))["type"] == "upstream_timeout"
    # Causality, not speed: the proxy waited for its 0.3 s timeout, and it was this one that
    # fired, not the 30 s default of proxy_config (a loaded machine may add seconds).
    elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 20, elapsed


async def test_connect_failure_is_retried_once_on_another_backend(
    backends: list[FakeBackend], make_proxy: ProxyFactory
) -> None:
    dead = FakeBackend("dead", port=free_port())
    live = await _backend(backends, "live")
    client = await make_proxy(proxy_config([dead, live]))
    for _ in range(4):  # round robin hits the dead backend on every other request
        resp = await client.post("/v1/chat/completions", json={"n": 1})
        assert resp.status == 200
        assert (await resp.json())["backend"] == "live"
    assert live.hits == 4
    assert all(s.body == b'{"n": 1}' for s in live.seen)


async def test_failed_response_is_not_retried(backends: list[FakeBackend],
                                              make_proxy: ProxyFactory) -> None:
    failing = await _backend(backends, "failing", mode="fail")
    other = await _backend(backends, "other")
    client = await make_proxy(proxy_config(backends))
    statuses = [(await client.post("/v1/chat/completions", json={})).status for _ in range(2)]
    assert sorted(statuses) == [200, 500]  # a backend's answer is relayed, not retried
    assert failing.hits == 1
    assert other.hits == 1


async def test_models_are_aggregated_and_deduplicated(backends: list[FakeBackend],
                                                      make_proxy: ProxyFactory) -> None:
    await _backend(backends, "a", models=("llama", "mistral"))
    await _backend(backends, "b", models=("mistral", "qwen"))
    await _backend(backends, "c", mode="fail", models=("broken",))
    client = await make_proxy(proxy_config(backends))
    resp = await client.get("/v1/models")
    assert resp.status == 200
    body = await resp.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["llama", "mistral", "qwen"]


async def test_headers_forwarded_without_hop_by_hop(backends: list[FakeBackend],
                                                    make_proxy: ProxyFactory) -> None:
    b = await _backend(backends, "a")
    client = await make_proxy(proxy_config(backends))
    resp = await client.post(
        "/v1/embeddings?x=1", json={},
        headers={"Connection": "keep-alive, X-Drop-Me", "X-Drop-Me": "1",
                 "Keep-Alive": "timeout=5", "X-Custom": "kept", "X-Forwarded-For": "10.0.0.1",
                 "Proxy-Authorization": "secret"},
    )
    assert resp.status == 200
    seen = b.seen[0]
    assert seen.path == "/v1/embeddings?x=1"
    assert seen.headers["X-Custom"] == "kept"
    # The peer is no trusted proxy: the client's own X-Forwarded-For is not passed on.
    assert seen.headers["X-Forwarded-For"] == "127.0.0.1"
    assert seen.headers["X-Request-ID"] == resp.headers["X-Request-ID"]
    for dropped in ("X-Drop-Me", "Keep-Alive", "Proxy-Authorization"):
        assert dropped not in seen.headers


async def test_only_configured_backends_are_reachable(backends: list[FakeBackend],
                                                      make_proxy: ProxyFactory) -> None:
    b = await _backend(backends, "a")
    client = await make_proxy(proxy_config(backends))
    # An absolute-form target or a smuggled host never changes where the request goes.
    resp = await client.get("/v1/..%2F..%2Fetc", headers={"Host": "evil.example"})
    assert resp.status == 400  # encoded slashes are refused (http/paths.py)
    assert (await client.get("/v1/x", headers={"Host": "evil.example"})).status == 200
    assert (await client.get("/admin-ish")).status == 404
    assert (await client.get("/v1/../health")).status == 404
    assert all(s.path.startswith("/v1/") for s in b.seen)


async def test_no_healthy_backend_gives_503(make_proxy: ProxyFactory) -> None:
    client = await make_proxy(proxy_config([]))
    resp = await client.post("/v1/chat/completions", json={})
    assert resp.status == 503
    assert (await _error(resp))["type"] == "no_backend_available"


@pytest.mark.parametrize("in_flight_cap", [1])
async def test_admission_control_rejects_fast(backends: list[FakeBackend],
                                              make_proxy: ProxyFactory, in_flight_cap: int) -> None:
    gate = asyncio.Event()
    await _backend(backends, "a", gate=gate)
    client = await make_proxy(proxy_config(
        backends, limits={"max_in_flight_per_worker": in_flight_cap}))
    parked = await client.post("/v1/chat/completions", json={"stream": True})
    rejected = await client.post("/v1/chat/completions", json={})
    assert rejected.status == 503
    assert rejected.headers["Retry-After"] == "1"
    assert (await _error(rejected))["type"] == "overloaded"
    gate.set()
    assert (await parked.read()).endswith(b"[DONE]\n\n")
    assert (await client.post("/v1/chat/completions", json={})).status == 200


async def test_metrics_count_requests(backends: list[FakeBackend],
                                      make_proxy: ProxyFactory) -> None:
    await _backend(backends, "a")
    client = await make_proxy(proxy_config(backends))
    await client.post("/v1/chat/completions", json={})
    resp = await client.post("/v1/chat/completions", data=b"x", headers={"X-Request-ID": "a b"})
    assert resp.headers["X-Request-ID"] != "a b"  # unsafe client ids are replaced
    await client.post("/v1/embeddings", data=b"x" * 10, headers={"Content-Length": "99999999"})
    text = generate_latest(client.app[METRICS].registry).decode()
    assert 'gpuproxy_requests_total{code_class="2xx",route="chat_completions"} 2.0' in text
    assert 'gpuproxy_request_duration_milliseconds_count{route="chat_completions"} 2.0' in text


async def test_failed_credentials_spend_the_ip_quota(backends: list[FakeBackend],
                                                     make_proxy: ProxyFactory) -> None:
    await _backend(backends, "a")
    client = await make_proxy(proxy_config(
        backends, auth={"enabled": True}, rate_limits={"enabled": True, "per_ip": 3}))
    statuses = []
    for _ in range(5):
        resp = await client.post("/v1/chat/completions", json={},
                                 headers={"Authorization": "Bearer guessed-token"})
        statuses.append(resp.status)
        error = await _error(resp)
        if resp.status == 429:
            assert error["type"] == "rate_limit_exceeded"
            assert int(resp.headers["Retry-After"]) >= 1
    assert statuses == [401, 401, 401, 429, 429]


async def test_errors_before_the_backend_carry_the_request_id(
    backends: list[FakeBackend], make_proxy: ProxyFactory, make_admin_api: AdminApiFactory,
) -> None:
    """Auth, admin API and routing errors, not only the forwarding ones."""
    await _backend(backends, "a")
    config = proxy_config(backends, auth={"enabled": True}, limits={"max_body_bytes": 1024})
    token = "adm-" + "t" * 40
    client = await make_proxy(config, Secrets(jwt_secret="s" * 32, admin_token=token))
    admin_api = await make_admin_api(client)
    admin = {"Authorization": f"Bearer {token}"}
    answers = [
        (401, await client.post("/v1/chat/completions", json={})),
        (401, await client.post("/v1/chat/completions", headers={"Authorization": "Basic x"})),
        (404, await client.get("/nope")),
        (401, await admin_api.get("/admin/keys")),
        (400, await admin_api.get("/admin/keys", params={"limit": "0"}, headers=admin)),
        (413, await admin_api.post("/admin/keys", data=b"x" * 4096, headers=admin)),
        (404, await admin_api.delete("/admin/keys/k", headers=admin)),
        (404, await admin_api.get("/nope", headers=admin)),
        (405, await admin_api.put("/admin/keys", headers=admin)),
        (503, await admin_api.get("/admin/keys", headers=admin)),  # no database
    ]
    for status, resp in answers:
        assert resp.status == status, await resp.text()
        error = await _error(resp)
        if status == 413:
            assert "spec.proxy.maxBodyBytes (1024 bytes)" in error["message"]
    resp = await client.get("/nope", headers={"X-Request-ID": "client-42"})
    assert (await _error(resp))["request_id"] == "client-42"

    no_admin = await make_admin_api(await make_proxy(config, Secrets(jwt_secret="s" * 32)))
    resp = await no_admin.get("/admin/keys", headers=admin)
    assert resp.status == 403
    assert (await _error(resp))["type"] == "permission_error"
