"""Token limits while Redis is unreachable follow rate_limits.on_redis_failure, as request
limits do: per-process windows ("local"), everything through ("open"), 503 ("closed"); a
budget is never checked per process (it would be spent once per process): only "open"
admits. Without Redis configured, token limits are per process."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from tests.proxy.conftest import ProxyFactory, proxy_config
from tests.proxy.fakes import FakeBackend, free_port

from gpuproxy_proxy.config import Secrets
from gpuproxy_proxy.runtime import RUNTIME

SECRET = "token-fallback-jwt-secret-" + "x" * 16
BODY = {"model": "m", "messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 3}


def _token(user: str) -> dict[str, str]:
    token = jwt.encode({"sub": user, "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")
    return {"Authorization": f"Bearer {token}"}


async def _proxy(make_proxy: ProxyFactory, backends: list[FakeBackend], mode: str,
                 redis: bool, budgets: bool = False) -> Any:
    if not backends:
        backends.append(await FakeBackend("gpu").start())
    overrides: dict[str, Any] = {
        "auth": {"enabled": True},
        "rate_limits": {"enabled": True, "on_redis_failure": mode, "per_ip": 10_000,
                        "tokens_per_minute": {"per_user": 40}},
        "budgets": {"enabled": budgets},
    }
    if redis:  # a port nothing listens on: every call fails at once
        overrides["redis"] = {"url": f"redis://127.0.0.1:{free_port()}/0"}
    client = await make_proxy(proxy_config(backends, **overrides), Secrets(jwt_secret=SECRET))
    client.app[RUNTIME].serving = True
    return client


async def _statuses(client: Any, user: str, count: int) -> list[int]:
    out = []
    for _ in range(count):
        resp = await client.post("/v1/chat/completions", json=BODY, headers=_token(user))
        await resp.read()
        out.append(resp.status)
    return out


@pytest.mark.parametrize("redis", [True, False])
async def test_local_fallback_limits_tokens_per_process(
    make_proxy: ProxyFactory, backends: list[FakeBackend], redis: bool,
) -> None:
    client = await _proxy(make_proxy, backends, "local", redis)
    # Reserved 17 each without a settle (the local counts keep the reservation): 2 fit in 40.
    assert await _statuses(client, "alice", 3) == [200, 200, 429]
    resp = await client.post("/v1/chat/completions", json=BODY, headers=_token("alice"))
    assert resp.status == 429
    assert (await resp.json())["error"]["type"] == "token_limit_exceeded"
    assert int(resp.headers["Retry-After"]) >= 1
    assert await _statuses(client, "bob", 1) == [200]  # per user


async def test_open_and_closed_fallbacks(
    make_proxy: ProxyFactory, backends: list[FakeBackend],
) -> None:
    client = await _proxy(make_proxy, backends, "open", True)
    assert await _statuses(client, "alice", 4) == [200] * 4
    client = await _proxy(make_proxy, backends, "closed", True)
    resp = await client.post("/v1/chat/completions", json=BODY, headers=_token("alice"))
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "1"


async def test_budgets_are_not_checked_per_process_without_redis(
    make_proxy: ProxyFactory, backends: list[FakeBackend],
) -> None:
    client = await _proxy(make_proxy, backends, "local", True, budgets=True)
    assert await _statuses(client, "alice", 1) == [503]
