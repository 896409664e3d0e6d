"""Rate limiting: the sliding-window math, Redis (shared by two limiters), fallback modes
while Redis is stopped, recovery, client IP resolution and the HTTP 429 shape."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from gpuproxy_proxy.appkeys import CONFIG, METRICS, SECRETS
from gpuproxy_proxy.auth.principal import ANONYMOUS, Principal
from gpuproxy_proxy.config import ProxyConfig, RateLimitConfig, RedisConfig, Secrets
from gpuproxy_proxy.limits.ratelimit import (
    RATE_LIMITER,
    RateLimiter,
    client_ip,
    rate_limit_headers,
    rate_limit_response,
    ratelimit_ctx,
)
from gpuproxy_proxy.limits.window import LocalWindowLimiter, Scope
from gpuproxy_proxy.observability.metrics import ProxyMetrics


def unique_ip() -> str:
    b = uuid.uuid4().bytes
    return f"10.{b[0]}.{b[1]}.{b[2]}"


# The product's 0.25 s Redis timeout is for production; on a loaded CI machine one slow round
# trip would turn an expected "redis" decision into a fallback. Tests about timeouts set their own.
REDIS_TIMEOUT = 10.0
# An hour-long window: exact counts cannot be disturbed by a window boundary passing mid-test
# (windows are aligned to the clock, so a slow test is likelier to straddle a 60 s boundary).
WINDOW = 3600


def redis_config(url: str, **overrides: Any) -> RedisConfig:
    return RedisConfig(url=url, **{"socket_timeout_seconds": REDIS_TIMEOUT, **overrides})


def limiter(redis: Any | None, metrics: ProxyMetrics | None = None, **limits: Any) -> RateLimiter:
    config = RateLimitConfig(**{"window_seconds": WINDOW, **limits})
    return RateLimiter(config, None if redis is None else redis_config(redis.url), Secrets(),
                       metrics)


def sample(metrics: ProxyMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# --- sliding window arithmetic (no Redis) --------------------------------------------------


def test_local_window_counts_and_decays() -> None:
    local = LocalWindowLimiter(window_seconds=60)
    scopes = [Scope("ip", "k", 10)]
    start = 6000.0  # a window boundary (6000 s is a multiple of 60 s)
    decisions = [local.check(scopes, now=start + 1) for _ in range(11)]
    assert [d.allowed for d in decisions] == [True] * 10 + [False]
    assert [d.remaining for d in decisions[:3]] == [9, 8, 7]
    assert decisions[-1].scope == "ip"
    assert decisions[-1].retry_after_seconds >= 59
    # Half-way into the next window the previous 10 count as 5: five more fit.
    later = [local.check(scopes, now=start + 90) for _ in range(6)]
    assert [d.allowed for d in later] == [True] * 5 + [False]
    # Retry-After points at when the previous window's weight has decayed enough.
    assert 1 <= later[-1].retry_after_seconds <= 30
    # Two windows later nothing is left.
    assert local.check(scopes, now=start + 181).remaining == 9


def test_most_restrictive_scope_wins() -> None:
    local = LocalWindowLimiter(window_seconds=60)
    scopes = [Scope("ip", "ip", 100), Scope("user", "u", 3), Scope("api_key", "k", 50)]
    decisions = [local.check(scopes, now=1.0) for _ in range(4)]
    assert [d.scope for d in decisions[:3]] == ["user"] * 3
    assert decisions[2].remaining == 0
    assert not decisions[3].allowed
    assert decisions[3].scope == "user"
    # A rejected request consumes no quota in any scope.
    other = local.check([Scope("ip", "ip", 100)], now=1.0)
    assert other.remaining == 100 - 3 - 1


def test_rate_limit_headers_and_response() -> None:
    local = LocalWindowLimiter(window_seconds=60)
    ok = local.check([Scope("api_key", "x", 1)], now=30.0)
    assert rate_limit_headers(ok) == {
        "X-RateLimit-Limit": "1", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "30",
    }
    rejected = local.check([Scope("api_key", "x", 1)], now=30.0)
    response = rate_limit_response(rejected, "rid-1")
    assert response.status == 429
    assert response.headers["Retry-After"] == str(rejected.retry_after_seconds)
    assert response.headers["X-Request-ID"] == "rid-1"
    assert response.text is not None
    error = json.loads(response.text)["error"]
    assert "'api_key'" in error["message"]
    assert error["request_id"] == "rid-1"


# --- client IP ------------------------------------------------------------------------------


def request_from(peer: str, xff: list[str] | None = None) -> web.Request:
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        (peer, 12345) if name == "peername" else default
    )
    headers = [("X-Forwarded-For", v) for v in xff or []]
    from multidict import CIMultiDict

    return make_mocked_request("GET", "/", headers=CIMultiDict(headers), transport=transport)


def test_client_ip_ignores_xff_from_untrusted_peer() -> None:
    req = request_from("203.0.113.9", ["1.2.3.4"])
    assert client_ip(req, []) == "203.0.113.9"
    assert client_ip(req, ["10.0.0.0/8"]) == "203.0.113.9"


def test_client_ip_walks_trusted_hops_right_to_left() -> None:
    trusted = ["10.0.0.0/8", "192.168.1.1/32"]
    # client, spoofed-by-client, real client, then two trusted proxies
    req = request_from("10.1.1.1", ["6.6.6.6, 198.51.100.7", "192.168.1.1"])
    assert client_ip(req, trusted) == "198.51.100.7"
    # All hops trusted: the leftmost one is the best we know.
    assert client_ip(request_from("10.1.1.1", ["10.2.2.2"]), trusted) == "10.2.2.2"
    # Garbage stops the walk at the last verified hop.
    assert client_ip(request_from("10.1.1.1", ["1.1.1.1, junk, 10.3.3.3"]), trusted) == "10.3.3.3"
    # No header: the trusted peer itself.
    assert client_ip(request_from("10.1.1.1"), trusted) == "10.1.1.1"
    # IPv4-mapped IPv6 peers count as their IPv4 address.
    assert client_ip(request_from("::ffff:10.1.1.1", ["8.8.8.8"]), trusted) == "8.8.8.8"


# --- Redis ---------------------------------------------------------------------------------


async def test_redis_limits_per_scope(redis_server: Any) -> None:
    metrics = ProxyMetrics()
    rl = limiter(redis_server, metrics, per_ip=5, per_user=3, per_api_key=2)
    try:
        ip = unique_ip()
        anon = [await rl.check(ip, ANONYMOUS) for _ in range(6)]
        assert [d.allowed for d in anon] == [True] * 5 + [False]
        assert anon[-1].scope == "ip"
        assert anon[-1].source == "redis"
        assert anon[0].limit == 5
        assert anon[0].remaining == 4

        user = Principal(kind="jwt", user_id="u-" + uuid.uuid4().hex)
        results = [await rl.check(unique_ip(), user) for _ in range(4)]
        assert [d.allowed for d in results] == [True] * 3 + [False]
        assert results[-1].scope == "user"
        assert results[-1].retry_after_seconds >= 1

        key = Principal(
            kind="api_key", user_id="u-" + uuid.uuid4().hex, api_key_id=str(uuid.uuid4())
        )
        results = [await rl.check(unique_ip(), key) for _ in range(3)]
        assert [d.scope for d in results] == ["api_key"] * 3
        assert [d.allowed for d in results] == [True, True, False]
        assert sample(metrics, "gpuproxy_ratelimit_rejections_total", scope="api_key") == 1
        assert sample(metrics, "gpuproxy_ratelimit_rejections_total", scope="ip") == 1
        assert rl.redis_ready()
    finally:
        await rl.close()


async def test_two_limiters_share_one_redis(redis_server: Any) -> None:
    # Two proxy processes = two limiters with their own pools against the same Redis.
    a, b = limiter(redis_server, per_ip=10), limiter(redis_server, per_ip=10)
    try:
        ip = unique_ip()
        results = []
        for i in range(12):
            results.append(await (a if i % 2 else b).check(ip, ANONYMOUS))
        assert sum(d.allowed for d in results) == 10
        assert not results[-1].allowed
        assert not results[-2].allowed
        # Concurrent checks stay exact: the script is atomic.
        ip2 = unique_ip()
        many = await asyncio.gather(*((a if i % 2 else b).check(ip2, ANONYMOUS) for i in range(40)))
        assert sum(d.allowed for d in many) == 10
    finally:
        await a.close()
        await b.close()


async def wait_for(predicate: Any, seconds: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("mode", ["local", "open", "closed"])
async def test_redis_outage_fallback_and_recovery(
    redis_server: Any, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = ProxyMetrics()
    rl = limiter(redis_server, metrics, per_ip=3, on_redis_failure=mode)
    caplog.set_level(logging.WARNING, logger="gpuproxy_proxy.limits.ratelimit")
    try:
        ip = unique_ip()
        assert (await rl.check(ip, ANONYMOUS)).source == "redis"
        redis_server.stop()
        during = [await rl.check(ip, ANONYMOUS) for _ in range(5)]
        assert not rl.redis_ready()
        assert {d.source for d in during} == {mode}
        if mode == "local":
            # Same limits, counted in this process (the Redis count is not known here).
            assert [d.allowed for d in during] == [True] * 3 + [False] * 2
            assert during[-1].status == 429
        elif mode == "open":
            assert all(d.allowed for d in during)
            assert rate_limit_headers(during[0]) == {}
        else:
            assert not any(d.allowed for d in during)
            assert rate_limit_response(during[0], "rid").status == 503
        assert sample(metrics, "gpuproxy_ratelimit_fallback_total", mode=mode) == 5
        outage_logs = [r for r in caplog.records if "Redis unreachable" in r.getMessage()]
        assert len(outage_logs) == 1

        redis_server.start()
        await wait_for(rl.redis_ready)
        after = await rl.check(unique_ip(), ANONYMOUS)
        assert after.source == "redis"
        assert after.allowed
        assert any("reachable again" in r.getMessage() for r in caplog.records)
    finally:
        redis_server.start()
        await rl.close()


async def test_no_redis_configured_uses_local_limiter() -> None:
    rl = limiter(None, per_ip=2)
    try:
        results = [await rl.check("1.2.3.4", ANONYMOUS) for _ in range(3)]
        assert [d.source for d in results] == ["local"] * 3
        assert [d.allowed for d in results] == [True, True, False]
        assert rl.redis_ready()
    finally:
        await rl.close()


async def test_disabled_rate_limits_allow_everything() -> None:
    rl = limiter(None, per_ip=1, enabled=False)
    results = [await rl.check("1.2.3.4", ANONYMOUS) for _ in range(3)]
    assert all(d.allowed for d in results)
    assert rate_limit_headers(results[0]) == {}


# --- over HTTP -----------------------------------------------------------------------------


async def limited(request: web.Request) -> web.Response:
    rl = request.app[RATE_LIMITER]
    decision = await rl.check(rl.client_ip(request), ANONYMOUS)
    if not decision.allowed:
        return rate_limit_response(decision, "rid")
    return web.Response(text="ok", headers=rate_limit_headers(decision))


async def test_http_429_with_headers(redis_server: Any) -> None:
    app = web.Application()
    app[CONFIG] = ProxyConfig(
        rate_limits=RateLimitConfig(per_ip=2, trusted_proxies=["127.0.0.1/32"],
                                    window_seconds=WINDOW),
        redis=redis_config(redis_server.url),
    )
    app[SECRETS] = Secrets()
    app[METRICS] = ProxyMetrics()
    app.cleanup_ctx.append(ratelimit_ctx)
    app.router.add_get("/", limited)
    async with TestClient(TestServer(app)) as client:
        headers = {"X-Forwarded-For": unique_ip()}  # the test client connects from 127.0.0.1
        first = await client.get("/", headers=headers)
        assert first.status == 200
        assert first.headers["X-RateLimit-Limit"] == "2"
        assert first.headers["X-RateLimit-Remaining"] == "1"
        assert int(first.headers["X-RateLimit-Reset"]) >= 1
        await client.get("/", headers=headers)
        third = await client.get("/", headers=headers)
        assert third.status == 429
        assert int(third.headers["Retry-After"]) >= 1
        assert third.headers["X-RateLimit-Remaining"] == "0"
        body = await third.json()
        assert body["error"]["type"] == "rate_limit_exceeded"
        assert "'ip'" in body["error"]["message"]
        # Another client behind the same trusted proxy has its own budget.
        other = await client.get("/", headers={"X-Forwarded-For": unique_ip()})
        assert other.status == 200


async def test_script_cache_flush_is_recovered(redis_server: Any) -> None:
    # A Redis restart or SCRIPT FLUSH forgets the script: the batch reloads it and resends.
    import redis.asyncio as aioredis

    rl = limiter(redis_server, per_ip=100)
    admin = aioredis.Redis.from_url(redis_server.url)
    try:
        ip = unique_ip()
        assert (await rl.check(ip, ANONYMOUS)).source == "redis"
        await admin.script_flush()
        results = await asyncio.gather(*(rl.check(ip, ANONYMOUS) for _ in range(20)))
        assert {d.source for d in results} == {"redis"}
        # Each request was counted exactly once despite the resend.
        assert min(d.remaining for d in results) == 100 - 21
        assert rl.redis_ready()
    finally:
        await admin.aclose()
        await rl.close()


async def test_redis_password_comes_from_secrets() -> None:
    import shutil
    import socket

    from tests.services import RedisServer, free_port, make_workdir

    password = uuid.uuid4().hex

    class PasswordRedis(RedisServer):
        def command(self) -> list[str]:
            return [*super().command(), "--requirepass", password]

        def is_ready(self) -> bool:
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                    sock.sendall(f"AUTH {password}\r\n".encode())
                    return sock.recv(64).startswith(b"+OK")
            except OSError:
                return False

    server = PasswordRedis(make_workdir("gpuproxy-redis-pw-", None), free_port())
    server.start()
    config = RateLimitConfig(per_ip=5)
    good = RateLimiter(config, redis_config(server.url), Secrets(redis_password=password))
    bad = RateLimiter(config, redis_config(server.url), Secrets(redis_password="wrong"))
    try:
        assert (await good.check(unique_ip(), ANONYMOUS)).source == "redis"
        assert (await bad.check(unique_ip(), ANONYMOUS)).source == "local"
        assert not bad.redis_ready()
    finally:
        await good.close()
        await bad.close()
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)


async def test_one_batch_decides_each_request_on_its_own(redis_server: Any) -> None:
    # Checks issued together travel in one script call; each is still decided atomically
    # with all of its own scopes, in order.
    rl = limiter(redis_server, per_ip=5, per_user=10, per_api_key=7)
    try:
        shared_ip = unique_ip()
        user = Principal(kind="jwt", user_id="u-" + uuid.uuid4().hex)
        keyed = Principal(kind="api_key", user_id="u-" + uuid.uuid4().hex,
                          api_key_id=str(uuid.uuid4()))
        calls = (
            [rl.check(shared_ip, ANONYMOUS) for _ in range(12)]
            + [rl.check(unique_ip(), user) for _ in range(15)]
            + [rl.check(unique_ip(), keyed) for _ in range(9)]
        )
        results = await asyncio.gather(*calls)
        anon, users, keys = results[:12], results[12:27], results[27:]
        assert sum(d.allowed for d in anon) == 5
        assert sum(d.allowed for d in users) == 10
        assert sum(d.allowed for d in keys) == 7
        assert {d.scope for d in keys if not d.allowed} == {"api_key"}
        assert {d.source for d in results} == {"redis"}
    finally:
        await rl.close()


def test_ipv6_clients_share_their_slash_64() -> None:
    rl = limiter(None, per_ip=2)
    ip_scope = rl.scopes("2001:db8:1:2::1", ANONYMOUS)[0].key
    assert ip_scope == rl.scopes("2001:db8:1:2:ffff::9", ANONYMOUS)[0].key
    assert ip_scope != rl.scopes("2001:db8:1:3::1", ANONYMOUS)[0].key
    assert rl.scopes("192.0.2.1", ANONYMOUS)[0].key != rl.scopes("192.0.2.2", ANONYMOUS)[0].key


async def test_rejected_client_is_answered_without_redis(redis_server: Any) -> None:
    rl = limiter(redis_server, per_ip=3)
    calls = 0
    original = rl._batcher.call

    def counting(keys: Any, limits: Any) -> Any:
        nonlocal calls
        calls += 1
        return original(keys, limits)

    rl._batcher.call = counting  # type: ignore[method-assign]
    try:
        ip = unique_ip()
        results = [await rl.check(ip, ANONYMOUS) for _ in range(10)]
        assert [d.allowed for d in results] == [True] * 3 + [False] * 7
        assert calls == 4  # three allowed and the first rejection; the rest stayed local
        assert all(d.scope == "ip" and d.retry_after_seconds >= 1 for d in results[3:])
        assert results[-1].retry_after_seconds <= results[3].retry_after_seconds
        # Other clients still go to Redis.
        assert (await rl.check(unique_ip(), ANONYMOUS)).allowed
        assert calls == 5
    finally:
        await rl.close()


async def test_hung_redis_times_out_into_fallback(redis_server: Any) -> None:
    # A Redis that accepts but never answers (frozen) must cost one socket timeout, not one
    # per queued batch: everything queued behind the stuck call falls back together.
    import os
    import signal

    rl = RateLimiter(
        RateLimitConfig(per_ip=1000),
        redis_config(redis_server.url, socket_timeout_seconds=0.2),
        Secrets(),
    )
    sent = 0
    original = rl._batcher._roundtrip

    async def counting(command: bytes) -> object:
        nonlocal sent
        sent += 1
        return await original(command)

    rl._batcher._roundtrip = counting  # type: ignore[method-assign]
    try:
        # Warm up (connect, load the script) within the short timeout; on a loaded machine a
        # first try may time out into the fallback, so retry until Redis answers.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while (await rl.check(unique_ip(), ANONYMOUS)).source != "redis":
            assert loop.time() < deadline, "Redis never answered within 0.2 s"
            await wait_for(rl.redis_ready)
        sent = 0
        os.kill(redis_server.pid, signal.SIGSTOP)
        try:
            results = await asyncio.gather(*(rl.check(unique_ip(), ANONYMOUS) for _ in range(800)))
        finally:
            os.kill(redis_server.pid, signal.SIGCONT)
        assert {d.source for d in results} == {"local"}
        assert all(d.allowed for d in results)
        # 800 calls make 4 batches; only the (at most two) on the wire were tried.
        assert sent <= 2
        await wait_for(rl.redis_ready)
    finally:
        await rl.close()
