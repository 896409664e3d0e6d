"""Token limits and budgets, exact across processes: two proxy processes (the real CLI, one
with two workers) share Redis and PostgreSQL through PgBouncer; a team's tokens per day and a
user's budget set through the admin API are never exceeded, and a stream is cut at its budget
with a final SSE error event. Also the Lua scripts against the real Redis, and the pure parts."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families
from tests.proxy.conftest import proxy_config
from tests.proxy.fakes import FakeBackend, free_port
from tests.proxy.procs import ProxyProcess, start_proxy

from gpuproxy_proxy.auth.principal import Principal
from gpuproxy_proxy.config import ModelPrice, ProxyConfig, RateLimitConfig
from gpuproxy_proxy.limits.reservation import (
    cost_micro_usd,
    parse_request,
    settle_delta,
    window_scopes,
)
from gpuproxy_proxy.limits.token_lua import RESERVE_LUA, SETTLE_LUA

ADMIN = "token-budgets-admin-" + secrets.token_hex(8)
CHAT = "/v1/chat/completions"
# 40 + 4 characters -> 11 tokens, + 3 for the message: the proxy's prompt estimate is 14.
PROMPT = [{"role": "user", "content": "x" * 40}]
RESERVED = 14 + 3  # the estimate plus max_tokens
ACTUAL = 10  # FakeBackend's usage: 7 prompt + 3 completion


def test_reservation_arithmetic() -> None:
    req = parse_request("chat_completions", json.dumps(
        {"model": "m", "messages": PROMPT, "max_tokens": 3, "n": 2}).encode(), 1024)
    assert (req.model, req.prompt_tokens, req.max_completion_tokens, req.tokens) == (
        "m", 14, 6, 20)
    assert parse_request("chat_completions", b'{"messages": []}', 77).max_completion_tokens == 77
    assert parse_request("embeddings", b'{"input": "abcdefgh"}', 77).tokens == 2
    # $1 / $2 per 1M tokens: micro-USD per token, rounded up.
    assert cost_micro_usd(ModelPrice(input=1.0, output=2.0), 7, 3) == 13
    assert cost_micro_usd(ModelPrice(input=0.15, output=0.6), 10, 1) == 3
    assert settle_delta(17, 10) == -7
    config = RateLimitConfig(tokens_per_minute={"per_user": 5},
                             tokens_per_day={"per_team": 9, "per_api_key": 0})
    scopes = window_scopes(config, Principal("api_key", "u", "k", "t"))
    assert scopes == [("user", "tl:user:u:m", 60, 5), ("team", "tl:team:t:d", 86400, 9)]


@pytest.mark.services
async def test_lua_reserves_in_all_scopes_or_none_settles_and_releases_expired(
    redis_server: Any,
) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    tag = secrets.token_hex(4)
    try:
        await client.set("bg:loaded", "1")
        await client.hset(f"bg:user:{tag}", mapping={"limit": 50, "unit": "tokens",
                                                      "period": "month"})
        keys = [f"tl:a:{tag}", f"tl:b:{tag}", f"bg:user:{tag}"]

        async def reserve(rid: str, tokens: int, ttl_ms: int = 60_000) -> list[Any]:
            return list(await client.eval(RESERVE_LUA, 3, *keys, 2, 1, rid, tokens, 0, ttl_ms,
                                          60, 100, 86400, 30))

        first = await reserve("r1", 20)
        assert first[:2] == [1, 0]
        window_a, window_b, prefix = first[2].decode(), first[7].decode(), first[12].decode()
        # b would pass 30 with 20 more: nothing is reserved anywhere.
        assert (await reserve("r2", 20))[:2] == [0, 2]
        assert int(await client.get(window_a)) == 20
        assert int(await client.get(prefix + ":r")) == 20
        # Settled with 8 real tokens: 12 refunded to the windows, the reservation released.
        await client.eval(SETTLE_LUA, 3, window_a, window_b, prefix, 2, 1, "r1", -12, 8)
        assert int(await client.get(window_a)) == 8
        assert int(await client.get(prefix + ":r")) == 0
        assert int(await client.get(prefix + ":s")) == 8
        # A budget reservation nobody settles (its proxy died) is released after its ttl.
        async def budget_only(rid: str, tokens: int, ttl_ms: int) -> list[Any]:
            return list(await client.eval(RESERVE_LUA, 1, keys[2], 0, 1, rid, tokens, 0,
                                          ttl_ms))

        assert (await budget_only("r3", 22, 1))[:2] == [1, 0]
        deadline = time.monotonic() + 30
        while True:
            reply = await budget_only("r4", 22, 60_000)
            if reply[0] == 1:
                break
            assert time.monotonic() < deadline, "the expired reservation was never released"
            await asyncio.sleep(0.05)
        assert int(await client.get(prefix + ":r")) == 22  # r4's only
        # No budgets loaded (Redis lost them): the caller is told to load them.
        await client.delete("bg:loaded")
        assert (await reserve("r5", 1))[0] == -1
    finally:
        await client.aclose()


def _config(backend: FakeBackend, pgbouncer: Any, redis: Any, workers: int,
            **overrides: Any) -> ProxyConfig:
    return proxy_config(
        [backend], workers=workers,
        listen={"host": "127.0.0.1", "port": free_port(), "admin_port": free_port(),
                "admin_api_port": free_port()},
        auth={"enabled": True},
        database={"host": pgbouncer.host, "port": pgbouncer.port,
                  "database": pgbouncer.database, "sslmode": "disable"},
        redis={"url": redis.url},
        reload={"enabled": False}, **overrides)


async def _call(proxy: ProxyProcess, method: str, path: str, token: str,
                payload: Any = None) -> tuple[int, dict[str, str], bytes]:
    """One request on a new connection (the kernel spreads those over the workers)."""
    base = proxy.admin_api if path.startswith("/admin/") else proxy.url
    async with aiohttp.ClientSession() as http, http.request(
        method, base + path, json=payload if payload is not None else {},
        headers={"Authorization": f"Bearer {token}", "Connection": "close"},
        timeout=aiohttp.ClientTimeout(total=60),
    ) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def _key(proxy: ProxyProcess, user: str, team: str | None = None) -> str:
    status, _, body = await _call(proxy, "POST", "/admin/keys", ADMIN,
                                  {"user_id": user, "team": team})
    assert status == 201, body
    assert json.loads(body)["team"] == team
    return str(json.loads(body)["key"])


async def _chat(proxy: ProxyProcess, key: str, **extra: Any) -> tuple[int, dict[str, str],
                                                                       bytes]:
    return await _call(proxy, "POST", CHAT, key,
                       {"model": "m", "messages": PROMPT, "max_tokens": 3, **extra})


async def _metric(proxy: ProxyProcess, name: str, **labels: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(
        proxy.admin + "/metrics", timeout=aiohttp.ClientTimeout(total=30)) as resp:
        text = await resp.text()
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == name and labels.items() <= sample.labels.items())


async def _until(check: Any, what: str) -> None:
    deadline = time.monotonic() + 60
    while not await check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def _drain(proxies: list[ProxyProcess], keys: list[str], settled: Any) -> int:
    """A concurrent burst over every proxy and key, then one at a time until refused; each
    success waits for its settle. Returns the successes."""
    results = await asyncio.gather(*(
        _chat(proxies[i % len(proxies)], keys[i % len(keys)]) for i in range(48)))
    assert {r[0] for r in results} <= {200, 429}, [r[:1] for r in results]
    ok = sum(r[0] == 200 for r in results)
    await _until(lambda: settled(ok), "the burst was never settled")
    i = 0
    while True:
        status, headers, body = await _chat(proxies[i % len(proxies)], keys[i % len(keys)])
        i += 1
        if status == 429:
            assert "Retry-After" in headers, headers
            return ok
        assert status == 200, body
        ok += 1
        await _until(lambda n=ok: settled(n), "a request was never settled")


async def test_token_limits_and_budgets_are_exact_across_workers_and_proxies(
    tmp_path: Path, pgbouncer_server: Any, redis_server: Any,
) -> None:
    backend = await FakeBackend("gpu", chunks=40, delay=0.01).start()
    env = {"GPUPROXY_ADMIN_TOKEN": ADMIN, "GPUPROXY_DB_USER": pgbouncer_server.user,
           "GPUPROXY_DB_PASSWORD": pgbouncer_server.password}
    limit = 200
    overrides = {
        "rate_limits": {"enabled": True, "tokens_per_day": {"per_team": limit},
                        "default_max_tokens": 4},
        "budgets": {"enabled": True, "stream_extend_tokens": 4,
                    "prices": {"m": {"input": 1.0, "output": 2.0}}},
    }
    redis = aioredis.Redis.from_url(redis_server.url)
    a = b = None
    try:
        a = await start_proxy(tmp_path / "a.yaml",
                              _config(backend, pgbouncer_server, redis_server, 1, **overrides),
                              tmp_path / "a.log", env)
        b = await start_proxy(tmp_path / "b.yaml",
                              _config(backend, pgbouncer_server, redis_server, 2, **overrides),
                              tmp_path / "b.log", env)
        tag = secrets.token_hex(4)
        team = "team-" + tag
        team_keys = [await _key(a, f"u1-{tag}", team), await _key(b, f"u2-{tag}", team)]

        # Tokens per day per team: two keys of one team through both proxies.
        day = int(time.time()) // 86400

        async def team_settled(ok: int) -> bool:
            raw = await redis.get(f"tl:team:{team}:d:{day}")
            return int(raw or 0) == ACTUAL * ok

        status, headers, _ = await _chat(a, team_keys[0])
        assert status == 200
        assert headers["X-RateLimit-Limit-Tokens"] == str(limit)
        assert int(headers["X-RateLimit-Remaining-Tokens"]) == limit - RESERVED
        await _until(lambda: team_settled(1), "the first request was never settled")
        ok = 1 + await _drain([a, b], team_keys, lambda n: team_settled(n + 1))
        # Exact: every admitted request fit (10 tokens each, reserved 17), none more.
        assert ok * ACTUAL <= limit
        assert ok * ACTUAL + RESERVED > limit, ok
        status, headers, body = await _chat(b, team_keys[1])
        assert status == 429
        assert json.loads(body)["error"]["type"] == "token_limit_exceeded"
        assert headers["X-RateLimit-Limit-Tokens"] == str(limit)
        assert headers["X-RateLimit-Remaining-Tokens"] == str(limit - ok * ACTUAL)

        # A user's USD budget through the admin API: $0.0002 = 200 micro-USD; each request
        # reserves 14 * 1 + 3 * 2 = 20 and costs 7 * 1 + 3 * 2 = 13.
        user = "u3-" + tag
        user_key = await _key(a, user)
        status, _, body = await _call(b, "PUT", f"/admin/budgets/user/{user}", ADMIN,
                                      {"limit": 0.0002, "unit": "usd", "period": "month"})
        assert status == 200, body
        assert json.loads(body)["remaining"] == 0.0002

        async def budget() -> dict[str, Any]:
            status, _, body = await _call(a, "GET", f"/admin/budgets/user/{user}", ADMIN)
            assert status == 200, body
            return json.loads(body)  # type: ignore[no-any-return]

        async def user_settled(n: int) -> bool:
            state = await budget()
            return bool(state["reserved"] == 0 and round(state["spent"] * 1e6) == 13 * n)

        ok = await _drain([a, b], [user_key], user_settled)
        state = await budget()
        assert round(state["spent"] * 1e6) == 13 * ok <= 200 < 13 * ok + 20, state
        assert state["resets_at"].endswith("Z")
        # Redis loses the budgets (a restart without persistence, an eviction): the next
        # request loads them again from PostgreSQL and is refused as before.
        await redis.delete("bg:loaded", f"bg:user:{user}")
        status, _, body = await _chat(b, user_key)
        assert status == 429, body
        error = json.loads(body)["error"]
        assert error["type"] == "budget_exceeded"
        assert f"the usd budget of user {user} does not cover this request: " in error["message"]
        assert "of 0.0002 usd left" in error["message"]
        assert (await budget())["limit"] == 0.0002

        # A stream cut at its budget: 30 tokens; it reserves 14 + 4 (default_max_tokens) and
        # asks for 4 more at a time until the budget refuses, then ends with an SSE error.
        user = "u4-" + tag
        stream_key = await _key(b, user)
        status, _, body = await _call(a, "PUT", f"/admin/budgets/user/{user}", ADMIN,
                                      {"limit": 30, "unit": "tokens", "period": "day"})
        assert status == 200, body
        status, _, body = await _call(b, "POST", CHAT, stream_key,
                                      {"model": "m", "messages": PROMPT, "stream": True})
        assert status == 200
        events = [e for e in body.decode().split("\n\n") if e.strip()]
        assert events[-1] == "data: [DONE]", events[-3:]
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert error["type"] == "budget_exceeded"
        assert f"budget of user {user} was reached" in error["message"]
        assert 1 < len(events) - 2 < 40  # cut before the backend's 40 chunks

        async def stream_settled() -> bool:
            _, _, body = await _call(a, "GET", f"/admin/budgets/user/{user}", ADMIN)
            state = json.loads(body)
            return bool(state["reserved"] == 0 and state["spent"] > 0)

        await _until(stream_settled, "the cut stream was never settled")
        status, _, body = await _call(a, "GET", f"/admin/budgets/user/{user}", ADMIN)
        assert json.loads(body)["spent"] <= 30, body
        assert await _metric(b, "gpuproxy_budget_stream_cuts_total") == 1
        rejected = [await _metric(p, "gpuproxy_token_limit_rejections_total", scope="team")
                    + await _metric(p, "gpuproxy_budget_rejections_total", scope="user")
                    for p in (a, b)]
        assert sum(rejected) >= 3, rejected
    finally:
        for proxy in (b, a):
            if proxy is not None:
                await proxy.stop()
        await backend.stop()
        await redis.aclose()
