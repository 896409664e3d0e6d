"""The admin API's budgets against the real Redis (no database: Redis is the only copy):
validation, 404s, the periods' resets (UTC day, Monday-started week, calendar month), and 409
while budgets are off."""

from __future__ import annotations

import calendar
import secrets
import time
from typing import Any

import pytest
from tests.proxy.conftest import AdminApiFactory, ProxyFactory, proxy_config
from tests.proxy.fakes import FakeBackend

from gpuproxy_proxy.config import Secrets

pytestmark = pytest.mark.services

ADMIN = "admin-budgets-token-" + secrets.token_hex(12)
AUTH = {"Authorization": f"Bearer {ADMIN}"}


async def _admin(make_proxy: ProxyFactory, make_admin_api: AdminApiFactory,
                 backends: list[FakeBackend], redis: Any, enabled: bool = True) -> Any:
    if not backends:
        backends.append(await FakeBackend("gpu").start())
    proxy = await make_proxy(proxy_config(
        backends, auth={"enabled": True}, redis={"url": redis.url},
        rate_limits={"enabled": True}, budgets={"enabled": enabled}),
        Secrets(admin_token=ADMIN))
    return await make_admin_api(proxy)


def _next_resets(now: float) -> dict[str, str]:
    t = time.gmtime(now)
    day = int(now) // 86400
    monday = day - (day + 3) % 7
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    stamp = "%Y-%m-%dT%H:%M:%SZ"
    return {"day": time.strftime(stamp, time.gmtime((day + 1) * 86400)),
            "week": time.strftime(stamp, time.gmtime((monday + 7) * 86400)),
            "month": time.strftime(stamp, time.gmtime(calendar.timegm(
                (year, month, 1, 0, 0, 0, 0, 0, 0))))}


async def test_budgets_are_set_read_and_deleted(
    make_proxy: ProxyFactory, make_admin_api: AdminApiFactory, backends: list[FakeBackend],
    redis_server: Any,
) -> None:
    admin = await _admin(make_proxy, make_admin_api, backends, redis_server)
    tag = secrets.token_hex(4)
    expected = _next_resets(time.time())
    for period in ("day", "week", "month"):
        resp = await admin.put(f"/admin/budgets/team/t-{tag}-{period}", headers=AUTH,
                               json={"limit": 1.5, "unit": "usd", "period": period})
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        assert (body["limit"], body["spent"], body["reserved"], body["remaining"]) == (
            1.5, 0, 0, 1.5)
        if time.gmtime().tm_hour not in (0, 23):  # a reset could fall between the two clocks
            assert body["resets_at"] == expected[period], period
    resp = await admin.get(f"/admin/budgets/team/t-{tag}-day", headers=AUTH)
    assert (await resp.json())["unit"] == "usd"
    resp = await admin.delete(f"/admin/budgets/team/t-{tag}-day", headers=AUTH)
    assert resp.status == 200
    for method in ("get", "delete"):
        resp = await getattr(admin, method)(f"/admin/budgets/team/t-{tag}-day", headers=AUTH)
        assert resp.status == 404
        assert (await resp.json())["error"]["type"] == "not_found_error"


@pytest.mark.parametrize(("path", "body", "message"), [
    ("/admin/budgets/org/x", {"limit": 1}, "scope must be one of api_key, user, team"),
    ("/admin/budgets/user/x", {"limit": 1.5}, "whole tokens"),
    ("/admin/budgets/user/x", {"limit": -1}, "'limit' must be a number >= 0"),
    ("/admin/budgets/user/x", {"limit": True}, "'limit' must be a number"),
    ("/admin/budgets/user/x", {"limit": 1, "unit": "eur"}, "'unit' must be one of tokens, usd"),
    ("/admin/budgets/user/x", {"limit": 1, "period": "year"}, "'period' must be one of"),
    ("/admin/budgets/user/x", [1], "must be a JSON object"),
])
async def test_invalid_budgets_are_refused(
    make_proxy: ProxyFactory, make_admin_api: AdminApiFactory, backends: list[FakeBackend],
    redis_server: Any, path: str, body: Any, message: str,
) -> None:
    admin = await _admin(make_proxy, make_admin_api, backends, redis_server)
    resp = await admin.put(path, headers=AUTH, json=body)
    assert resp.status == 400
    assert message in (await resp.json())["error"]["message"]


async def test_budgets_off_and_admin_token_required(
    make_proxy: ProxyFactory, make_admin_api: AdminApiFactory, backends: list[FakeBackend],
    redis_server: Any,
) -> None:
    admin = await _admin(make_proxy, make_admin_api, backends, redis_server, enabled=False)
    resp = await admin.put("/admin/budgets/user/x", headers=AUTH, json={"limit": 1})
    assert resp.status == 409
    assert "budgets are off" in (await resp.json())["error"]["message"]
    resp = await admin.get("/admin/budgets/user/x", headers={"Authorization": "Bearer nope"})
    assert resp.status == 401
