"""Spend through the admin API (`GET /admin/spend`) from the usage records in the real
PostgreSQL through PgBouncer: per team, model, key and user, per UTC day over a range, priced
by the price table; the bounded spend and token counters; and the refusals."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from tests.proxy.conftest import AdminApiFactory, ProxyFactory, proxy_config
from tests.proxy.fakes import FakeBackend

from gpuproxy_proxy.appkeys import METRICS
from gpuproxy_proxy.config import Secrets

pytestmark = pytest.mark.services

ADMIN = "admin-spend-token-" + secrets.token_hex(12)
AUTH = {"Authorization": f"Bearer {ADMIN}"}
CHAT = "/v1/chat/completions"
# FakeBackend's usage: 7 prompt + 3 completion tokens per request.
PRICED = 7 * 1.0 + 3 * 2.0  # micro-USD at $1 / $2 per 1M tokens
DEFAULT = 7 * 0.5 + 3 * 0.5  # the default price


def _database(pgbouncer: Any) -> dict[str, Any]:
    return {"host": pgbouncer.host, "port": pgbouncer.port, "database": pgbouncer.database,
            "sslmode": "disable"}


async def _setup(make_proxy: ProxyFactory, make_admin_api: AdminApiFactory,
                 backends: list[FakeBackend], pgbouncer: Any, spool: Path,
                 model: str) -> tuple[Any, Any]:
    backends.append(await FakeBackend("gpu").start())
    proxy = await make_proxy(proxy_config(
        backends, auth={"enabled": True}, database=_database(pgbouncer),
        metering={"enabled": True, "flush_interval_seconds": 0.1, "spool_dir": str(spool)},
        budgets={"prices": {model: {"input": 1.0, "output": 2.0}},
                 "default_price": {"input": 0.5, "output": 0.5}}),
        Secrets(admin_token=ADMIN, db_user=pgbouncer.user, db_password=pgbouncer.password))
    return proxy, await make_admin_api(proxy)


async def _key(admin: Any, user: str, team: str | None) -> tuple[str, str]:
    deadline = time.monotonic() + 60
    while True:  # the pool connects in the background
        resp = await admin.post("/admin/keys", headers=AUTH,
                                json={"user_id": user, "team": team})
        if resp.status != 503 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    return body["id"], body["key"]


async def _rows(dsn: str, user: str, count: int) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn, statement_cache_size=0)
    deadline = time.monotonic() + 60
    try:
        while True:
            rows = await conn.fetch("SELECT model, team, api_key_id FROM usage_records "
                                    "WHERE user_id = $1 ORDER BY model", user)
            if len(rows) >= count:
                return rows
            assert time.monotonic() < deadline, f"{len(rows)} of {count} records written"
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


async def _spend(admin: Any, query: str) -> dict[str, Any]:
    resp = await admin.get("/admin/spend?" + query, headers=AUTH)
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


def _summary(body: dict[str, Any]) -> dict[Any, tuple[int, int, int, float]]:
    key = body["group_by"]
    return {g[key]: (g["requests"], g["prompt_tokens"], g["completion_tokens"],
                     round(g["cost_usd"] * 1e6, 3)) for g in body["spend"]}


async def test_spend_per_team_model_key_and_user(
    make_proxy: ProxyFactory, make_admin_api: AdminApiFactory, backends: list[FakeBackend],
    pgbouncer_server: Any, tmp_path: Path,
) -> None:
    tag = secrets.token_hex(4)
    model, stray, user, team = f"m-{tag}", f"random-{tag}", f"u-{tag}", f"t-{tag}"
    proxy, admin = await _setup(make_proxy, make_admin_api, backends, pgbouncer_server,
                                tmp_path / "spool", model)
    team_key, team_secret = await _key(admin, user, team)
    lone_key, lone_secret = await _key(admin, user, None)
    for secret, name in ((team_secret, model), (team_secret, model), (lone_secret, stray)):
        resp = await proxy.post(CHAT, headers={"Authorization": f"Bearer {secret}"},
                                json={"model": name, "messages": [{"role": "user",
                                                                   "content": "hi"}]})
        assert resp.status == 200, await resp.text()
    rows = await _rows(pgbouncer_server.dsn, user, 3)
    assert [(r["model"], r["team"]) for r in rows] == [(model, team), (model, team),
                                                       (stray, None)]

    by_team = await _spend(admin, f"group_by=team&user_id={user}")
    assert by_team["from"] == by_team["to"] == datetime.now(UTC).date().isoformat() or (
        time.gmtime().tm_hour == 0)
    assert _summary(by_team) == {team: (2, 14, 6, 2 * PRICED), None: (1, 7, 3, DEFAULT)}
    assert by_team["total"]["requests"] == 3
    assert round(by_team["total"]["cost_usd"] * 1e6, 3) == 2 * PRICED + DEFAULT
    assert _summary(await _spend(admin, f"group_by=model&user_id={user}")) == {
        model: (2, 14, 6, 2 * PRICED), stray: (1, 7, 3, DEFAULT)}
    assert _summary(await _spend(admin, f"group_by=api_key&team={team}")) == {
        team_key: (2, 14, 6, 2 * PRICED)}
    assert _summary(await _spend(admin, f"group_by=user&model={stray}")) == {
        user: (1, 7, 3, DEFAULT)}
    assert _summary(await _spend(admin, f"group_by=user&api_key_id={lone_key}")) == {
        user: (1, 7, 3, DEFAULT)}
    limited = await _spend(admin, f"group_by=model&user_id={user}&limit=1")
    assert len(limited["spend"]) == 1
    assert limited["truncated"]

    # The counters: bounded labels, the stray model counted as "other".
    registry = proxy.app[METRICS].registry
    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)
    assert round((sample("gpuproxy_spend_usd_total", team=team, model=model) or 0) * 1e6,
                 3) == 2 * PRICED
    assert round((sample("gpuproxy_spend_usd_total", team="", model="other") or 0) * 1e6,
                 3) == DEFAULT
    assert sample("gpuproxy_tokens_total", team=team, model=model, kind="prompt") == 14
    assert sample("gpuproxy_tokens_total", team=team, model=model, kind="completion") == 6
    assert sample("gpuproxy_tokens_total", team="", model=stray, kind="prompt") is None


async def test_spend_per_day_over_a_range(
    make_proxy: ProxyFactory, make_admin_api: AdminApiFactory, backends: list[FakeBackend],
    pgbouncer_server: Any, tmp_path: Path,
) -> None:
    tag = secrets.token_hex(4)
    model, team = f"m-{tag}", f"t-{tag}"
    _, admin = await _setup(make_proxy, make_admin_api, backends, pgbouncer_server,
                            tmp_path / "spool", model)
    await _key(admin, f"u-{tag}", team)  # the migrations have run
    now = datetime.now(UTC)
    yesterday = now - timedelta(days=1)
    conn = await asyncpg.connect(pgbouncer_server.dsn, statement_cache_size=0)
    try:
        for when, prompt in ((now, 100), (yesterday, 1000), (yesterday, 1000)):
            await conn.execute(
                "INSERT INTO usage_records (id, request_id, principal_kind, route, status, "
                "prompt_tokens, completion_tokens, total_tokens, created_at, model, team) "
                "VALUES ($1, $2, 'api_key', 'chat_completions', 200, $3, 0, $3, $4, $5, $6)",
                uuid.uuid4(), f"spend-{tag}", prompt, when, model, team)
    finally:
        await conn.close()
    today, before = now.date().isoformat(), yesterday.date().isoformat()
    body = await _spend(admin, f"group_by=team&team={team}&from={before}&to={today}")
    assert [(g["day"], g["requests"], g["prompt_tokens"], g["cost_usd"])
            for g in body["spend"]] == [(before, 2, 2000, 0.002), (today, 1, 100, 0.0001)]
    body = await _spend(admin, f"group_by=model&team={team}&day={before}")
    assert [(g["day"], g["model"], g["requests"]) for g in body["spend"]] == [
        (before, model, 2)]


@pytest.mark.parametrize(("query", "message"), [
    ("group_by=org", "'group_by' must be one of api_key, user, team, model"),
    ("day=yesterday", "'day' must be a day YYYY-MM-DD"),
    ("day=2026-01-01&from=2026-01-01", "either 'day' or 'from'/'to'"),
    ("from=2026-01-01&to=2026-03-01", "at most 31 days"),
    ("from=2026-01-02&to=2026-01-01", "'to' must not be before 'from'"),
    ("limit=0", "'limit' must be an integer from 1 to 10000"),
])
async def test_invalid_spend_queries_are_refused(
    make_proxy: ProxyFactory, make_admin_api: AdminApiFactory, backends: list[FakeBackend],
    query: str, message: str,
) -> None:
    backends.append(await FakeBackend("gpu").start())
    proxy = await make_proxy(proxy_config(backends, auth={"enabled": True}),
                             Secrets(admin_token=ADMIN))
    admin = await make_admin_api(proxy)
    resp = await admin.get("/admin/spend?" + query, headers=AUTH)
    assert resp.status == 400
    assert message in (await resp.json())["error"]["message"]
    # Without a database there is nothing to read: 409 naming the config section.
    resp = await admin.get("/admin/spend", headers=AUTH)
    assert resp.status == 409
    assert "set a database section" in (await resp.json())["error"]["message"]
    resp = await admin.get("/admin/spend", headers={"Authorization": "Bearer nope"})
    assert resp.status == 401
