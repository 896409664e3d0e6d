"""Issue 11 item 5: the admin API on its own listener (not the client port), failed admin
authentication locked out per IP with backoff, a minimum admin token length, and the admin
token never a /v1 credential."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from tests.proxy.conftest import AdminApiFactory, ProxyFactory, proxy_config
from tests.proxy.fakes import FakeBackend, free_port
from tests.proxy.procs import start_proxy

from gpuproxy_proxy.appkeys import METRICS
from gpuproxy_proxy.auth.admin import ADMIN_GUARD
from gpuproxy_proxy.auth.adminguard import AdminAuthGuard
from gpuproxy_proxy.auth.authenticator import MIN_ADMIN_TOKEN_CHARS, Authenticator
from gpuproxy_proxy.config import AuthConfig, ProxyConfig, Secrets
from gpuproxy_proxy.http.adminlistener import AdminApiListener
from gpuproxy_proxy.process.server import reuseport_socket

JWT_SECRET = "listener-jwt-secret-" + "j" * 32
ADMIN_TOKEN = "listener-admin-token-" + "a" * 32
CHAT = "/v1/chat/completions"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _auth_proxy(backends: list[FakeBackend], make_proxy: ProxyFactory,
                      admin_token: str = ADMIN_TOKEN) -> Any:
    backends.append(await FakeBackend("gpu").start())
    return await make_proxy(proxy_config(backends, auth={"enabled": True}),
                            Secrets(jwt_secret=JWT_SECRET, admin_token=admin_token))


# --- the client port no longer serves it ------------------------------------------------------

async def test_client_port_answers_admin_paths_with_404_even_with_the_admin_token(
    backends: list[FakeBackend], make_proxy: ProxyFactory
) -> None:
    client = await _auth_proxy(backends, make_proxy)
    for method, path in [("GET", "/admin/keys"), ("POST", "/admin/keys"),
                         ("DELETE", "/admin/keys/some-id"), ("GET", "/admin")]:
        resp = await client.request(method, path, json={"user_id": "u"},
                                    headers=_bearer(ADMIN_TOKEN))
        error = (await resp.json())["error"]
        assert resp.status == 404, (method, path, error)
        assert error["type"] == "not_found"
        # The open port does not point at the admin API.
        assert error["message"] == (f"no route for {method} {path}; the proxy serves /v1/* "
                                    "(OpenAI-compatible)")
    assert not backends[0].seen


def test_admin_api_port_is_off_by_default_and_must_not_reuse_a_port() -> None:
    assert not ProxyConfig().listen.admin_api_enabled
    assert not ProxyConfig.model_validate({"listen": {"admin_api_port": 0}}).listen \
        .admin_api_enabled
    assert ProxyConfig.model_validate({"listen": {"admin_api_port": 9091}}).listen \
        .admin_api_enabled
    for clash in (8080, 9090):
        with pytest.raises(ValueError, match=r"listen\.admin_api_port must differ"):
            ProxyConfig.model_validate({"listen": {"admin_api_port": clash}})


# --- the admin token is not a /v1 credential ------------------------------------------------

async def test_admin_token_is_refused_on_v1(
    backends: list[FakeBackend], make_proxy: ProxyFactory
) -> None:
    client = await _auth_proxy(backends, make_proxy)
    for headers in (_bearer(ADMIN_TOKEN), {"X-API-Key": ADMIN_TOKEN}):
        resp = await client.post(CHAT, json={}, headers=headers)
        assert resp.status == 401, await resp.text()
        assert ADMIN_TOKEN not in await resp.text()
        resp = await client.get("/v1/models", headers=headers)
        assert resp.status == 401
    assert not backends[0].seen


async def test_admin_token_is_refused_on_v1_even_when_it_is_also_a_valid_jwt(
    backends: list[FakeBackend], make_proxy: ProxyFactory
) -> None:
    valid_jwt = jwt.encode({"sub": "root", "exp": int(time.time()) + 3600}, JWT_SECRET,
                           algorithm="HS256")
    client = await _auth_proxy(backends, make_proxy, admin_token=valid_jwt)
    resp = await client.post(CHAT, json={}, headers=_bearer(valid_jwt))
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert not backends[0].seen


# --- minimum admin token length ----------------------------------------------------------------

def test_a_short_admin_token_turns_the_admin_api_off_and_says_how_to_fix_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    short = "x" * (MIN_ADMIN_TOKEN_CHARS - 1)
    with caplog.at_level(logging.ERROR, "gpuproxy_proxy.auth.authenticator"):
        auth = Authenticator(AuthConfig(), Secrets(admin_token=short), None)
    assert not auth.admin_enabled
    assert not auth.is_admin_token(short)
    assert auth.admin_refused is not None
    assert "too short" in auth.admin_refused
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    message = record.getMessage()
    assert "GPUPROXY_ADMIN_TOKEN" in message
    assert "31 characters" in message
    assert f"at least {MIN_ADMIN_TOKEN_CHARS}" in message
    assert short not in message
    auth.set_admin_token("y" * MIN_ADMIN_TOKEN_CHARS)
    assert auth.admin_enabled
    assert auth.admin_refused is None


async def test_admin_api_with_a_short_token_answers_403_naming_the_problem(
    backends: list[FakeBackend], make_proxy: ProxyFactory, make_admin_api: AdminApiFactory,
) -> None:
    short = "short-admin-token"
    admin_api = await make_admin_api(await _auth_proxy(backends, make_proxy, admin_token=short))
    resp = await admin_api.get("/admin/keys", headers=_bearer(short))
    assert resp.status == 403
    message = (await resp.json())["error"]["message"]
    assert "disabled" in message
    assert "too short" in message
    assert short not in message


# --- failed admin authentication: lockout with backoff ----------------------------------------

def test_guard_locks_out_after_free_failures_doubling_up_to_the_cap() -> None:
    clock = FakeClock()
    guard = AdminAuthGuard(free_failures=3, first_lockout=1.0, max_lockout=8.0,
                           forget_after=60.0, clock=clock)
    ip = "198.51.100.7"
    assert [guard.failed(ip, "invalid admin token") for _ in range(2)] == [0.0, 0.0]
    assert guard.retry_after(ip) is None
    lockouts = []
    for _ in range(5):
        lockouts.append(guard.failed(ip, "invalid admin token"))
        assert guard.retry_after(ip) == lockouts[-1]
        clock.now += lockouts[-1]  # waited it out: the next attempt is allowed, and fails
        assert guard.retry_after(ip) is None
    assert lockouts == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert guard.retry_after("203.0.113.1") is None  # per IP
    guard.succeeded(ip)
    assert guard.failed(ip, "invalid admin token") == 0.0  # a success forgets the failures


def test_guard_forgets_after_a_quiet_period_counted_from_the_lockout_end() -> None:
    clock = FakeClock()
    guard = AdminAuthGuard(free_failures=1, first_lockout=100.0, max_lockout=100.0,
                           forget_after=60.0, clock=clock)
    assert guard.failed("10.0.0.1", "no credentials") == 100.0
    clock.now += 130.0  # 130 s after the failure but only 30 s after the lockout
    assert guard.failed("10.0.0.1", "no credentials") == 100.0  # still counted
    clock.now += 161.0
    assert guard.retry_after("10.0.0.1") is None
    assert len(guard) == 0


def test_guard_memory_is_bounded_least_recent_first(caplog: pytest.LogCaptureFixture) -> None:
    guard = AdminAuthGuard(free_failures=1, max_ips=100, clock=FakeClock())
    with caplog.at_level(logging.WARNING, "gpuproxy.admin"):
        for i in range(1000):
            guard.failed(f"10.1.{i // 256}.{i % 256}", "invalid admin token")
    assert len(guard) == 100
    assert guard.retry_after("10.1.0.0") is None  # evicted
    assert guard.retry_after("10.1.3.231") is not None  # the most recent stays
    assert "10.1.3.231" in caplog.records[-1].getMessage()


async def test_failed_admin_auth_over_http_gets_429_with_growing_retry_after(
    backends: list[FakeBackend], make_proxy: ProxyFactory,
) -> None:
    proxy = await _auth_proxy(backends, make_proxy)
    clock = FakeClock()
    listener = AdminApiListener(proxy.app)
    listener.app[ADMIN_GUARD] = AdminAuthGuard(clock=clock)  # the defaults, a clock we move
    port = free_port()
    await listener.start(reuseport_socket("127.0.0.1", port, 16, "listen.admin_api_port"))
    url = f"http://127.0.0.1:{port}/admin/keys"
    try:
        async with aiohttp.ClientSession() as http:
            async def status(headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
                async with http.get(url, headers=headers) as resp:
                    return resp.status, {"retry": resp.headers.get("Retry-After"),
                                         "body": await resp.json()}

            wrong = _bearer("wrong-" + "w" * 40)
            assert [(await status(wrong))[0] for _ in range(4)] == [401] * 4
            assert (await status({}))[0] == 401  # missing credentials count too: 5th
            code, answer = await status(_bearer(ADMIN_TOKEN))
            assert (code, answer["retry"]) == (429, "1")  # even the right token, while locked
            assert answer["body"]["error"]["type"] == "rate_limit_exceeded"
            clock.now += 1.0
            assert (await status(wrong))[0] == 401
            assert (await status(wrong))[1]["retry"] == "2"
            clock.now += 2.0
            assert (await status(_bearer(ADMIN_TOKEN)))[0] == 503  # accepted; no database
            assert (await status(wrong))[0] == 401  # the success forgot the failures
    finally:
        await listener.close()
    registry = proxy.app[METRICS].registry
    refused = {outcome: registry.get_sample_value("gpuproxy_admin_auth_refused_total",
                                                  {"outcome": outcome})
               for outcome in ("failed", "locked_out")}
    assert refused == {"failed": 7.0, "locked_out": 2.0}


# --- the real CLI: every worker serves it on listen.admin_api_port -------------------------------

@pytest.mark.parametrize("workers", [1, 2])  # serve_single, and the supervisor's workers
async def test_cli_workers_serve_the_admin_api_on_its_own_port(
    tmp_path: Path, backends: list[FakeBackend], workers: int,
) -> None:
    backends.append(await FakeBackend("gpu").start())
    port, admin_port, api_port = free_port(), free_port(), free_port()
    config = proxy_config(backends, workers=workers, auth={"enabled": True}, listen={
        "host": "127.0.0.1", "port": port, "admin_port": admin_port,
        "admin_api_port": api_port})
    proxy = await start_proxy(tmp_path / "proxy.yaml", config, tmp_path / "proxy.log",
                              env={"GPUPROXY_ADMIN_TOKEN": ADMIN_TOKEN,
                                   "GPUPROXY_JWT_SECRET": JWT_SECRET})
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            for _ in range(4):  # new connections: the kernel spreads them over the workers
                async with http.get(f"http://127.0.0.1:{api_port}/admin/keys",
                                    headers={**_bearer(ADMIN_TOKEN), "Connection": "close"}
                                    ) as resp:
                    assert resp.status == 503, await resp.text()  # authorized; no database
            async with http.get(f"{proxy.url}/admin/keys", headers=_bearer(ADMIN_TOKEN)) as resp:
                assert resp.status == 404
            async with http.post(f"{proxy.url}{CHAT}", json={},
                                 headers=_bearer(ADMIN_TOKEN)) as resp:
                assert resp.status == 401
    finally:
        await proxy.stop()


async def test_cli_without_admin_api_port_opens_no_admin_listener_and_says_so(
    tmp_path: Path, backends: list[FakeBackend],
) -> None:
    backends.append(await FakeBackend("gpu").start())
    port, admin_port = free_port(), free_port()
    config = proxy_config(backends, listen={"host": "127.0.0.1", "port": port,
                                            "admin_port": admin_port})
    proxy = await start_proxy(tmp_path / "proxy.yaml", config, tmp_path / "proxy.log",
                              env={"GPUPROXY_ADMIN_TOKEN": ADMIN_TOKEN})
    try:
        deadline = time.monotonic() + 30
        while not any("listen.admin_api_port is not" in line.get("msg", "")
                      for line in proxy.log_lines()):
            assert time.monotonic() < deadline, proxy.log_path.read_text()
            await asyncio.sleep(0.1)
        assert ADMIN_TOKEN not in proxy.log_path.read_text()
    finally:
        await proxy.stop()
