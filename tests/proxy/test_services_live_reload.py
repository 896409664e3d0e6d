"""Live reload on a running two-worker proxy (the real CLI): every reloadable section changes
behaviour in both workers while one client connection stays open through all the changes; a
restart-only change is logged and not applied."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import jwt
import pytest
from tests.proxy.conftest import proxy_config
from tests.proxy.fakes import FakeBackend, free_port
from tests.proxy.procs import ProxyProcess, RawConnection, start_proxy, write_config

from gpuproxy_proxy.config import ProxyConfig

SECRET = "live-reload-secret-" + "s" * 32
CHAT = "/v1/chat/completions"


def _token(**claims: Any) -> str:
    return jwt.encode({"sub": "u1", "exp": int(time.time()) + 3600, **claims}, SECRET,
                      algorithm="HS256")


def _config(backends: list[FakeBackend], port: int, admin: int, **over: Any) -> ProxyConfig:
    return proxy_config(backends, workers=2, **{
        "listen": {"host": "127.0.0.1", "port": port, "admin_port": admin},
        "auth": {"enabled": True},
        "rate_limits": {"enabled": True, "per_ip": 1000},
        "reload": {"interval_seconds": 0.1},
        **over,
    })


class Phases:
    """Writes each new config, waits until both workers run it, keeps count of generations."""

    def __init__(self, proxy: ProxyProcess, path: Path, config: ProxyConfig) -> None:
        self.proxy, self.path, self.config, self.generation = proxy, path, config, 1

    async def change(self, **sections: dict[str, Any] | list[Any]) -> None:
        data = self.config.model_dump(mode="json")
        for key, value in sections.items():
            data[key] = {**data[key], **value} if isinstance(value, dict) else value
        self.config = ProxyConfig.model_validate(data)
        write_config(self.path, self.config)
        self.generation += 1
        await self.proxy.wait_generation(self.generation)


async def _fresh(proxy: ProxyProcess, token: str, body: bytes = b"{}",
                 request_id: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request on a new connection (the kernel spreads those over both workers)."""
    headers = {"Authorization": f"Bearer {token}", "Connection": "close"}
    if request_id:
        headers["X-Request-ID"] = request_id
    async with aiohttp.ClientSession() as http, http.post(
        proxy.url + CHAT, data=body, headers=headers,
        timeout=aiohttp.ClientTimeout(total=60),
    ) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def test_every_reloadable_section_applies_without_dropping_a_connection(
    tmp_path: Path, backends: list[FakeBackend], pgbouncer_server: Any
) -> None:
    # Streams of about 6 s from either backend (the connection-cap phase holds them open).
    a = await FakeBackend("a", chunks=30, delay=0.2).start()
    b = await FakeBackend("b", chunks=30, delay=0.2).start()
    backends += [a, b]
    port, admin = free_port(), free_port()
    db = {"host": pgbouncer_server.host, "port": pgbouncer_server.port,
          "database": pgbouncer_server.database, "sslmode": "disable"}
    config = _config([a], port, admin, database=db,
                     # Nothing is written until a reload shortens the interval.
                     metering={"enabled": True, "batch_size": 10000,
                               "flush_interval_seconds": 600})
    path = tmp_path / "proxy.yaml"
    proxy = await start_proxy(path, config, tmp_path / "proxy.log", env={
        "GPUPROXY_JWT_SECRET": SECRET, "GPUPROXY_DB_USER": pgbouncer_server.user,
        "GPUPROXY_DB_PASSWORD": pgbouncer_server.password})
    phases = Phases(proxy, path, config)
    tag = f"reload-{uuid.uuid4().hex[:8]}"
    sent: list[str] = []
    kept = await RawConnection.open("127.0.0.1", port)
    token = _token()

    async def still_open() -> None:
        rid = f"{tag}-kept-{kept.requests}"
        sent.append(rid)
        answer = await kept.request("POST", CHAT, b"{}", {"Authorization": f"Bearer {token}",
                                                          "X-Request-ID": rid})
        assert answer.status == 200, answer

    try:
        await still_open()
        # auth: an audience is now required.
        await phases.change(auth={"jwt_audience": "gpu-api"})
        status, _, body = await _fresh(proxy, token)
        assert status == 401
        assert b"aud" in body
        token = _token(aud="gpu-api")
        await still_open()
        # rate_limits: a new per-IP limit.
        await phases.change(rate_limits={"per_ip": 500})
        for _ in range(4):
            status, headers, _ = await _fresh(proxy, token)
            assert (status, headers["X-RateLimit-Limit"]) == (200, "500")
        await still_open()
        # limits: a smaller body limit.
        await phases.change(limits={"max_body_bytes": 1000})
        status, _, body = await _fresh(proxy, token, json.dumps({"pad": "x" * 2000}).encode())
        assert status == 413
        assert b"1000 bytes" in body
        await still_open()
        # upstream: streams are ended after max_request_seconds with a final SSE error event.
        await phases.change(upstream={"max_request_seconds": 2.0})
        status, _, body = await _fresh(proxy, token, b'{"stream": true}')
        assert status == 200
        assert b"event: error" in body
        assert b"request_timeout" in body
        assert b"[DONE]" not in body
        await phases.change(upstream={"max_request_seconds": 0.0})
        await still_open()
        # metering: the buffered records are written once the interval is short.
        for i in range(3):
            sent.append(f"{tag}-fresh-{i}")
            assert (await _fresh(proxy, token, request_id=sent[-1]))[0] == 200
        await phases.change(metering={"flush_interval_seconds": 0.2})
        await still_open()
        conn = await asyncpg.connect(pgbouncer_server.dsn, statement_cache_size=0)
        try:
            deadline = time.monotonic() + 60
            while True:
                rows = await conn.fetch("SELECT request_id FROM usage_records "
                                        "WHERE request_id LIKE $1", tag + "-%")
                if {r["request_id"] for r in rows} >= set(sent):
                    break
                assert time.monotonic() < deadline, (len(rows), len(sent))
                await asyncio.sleep(0.2)
        finally:
            await conn.close()
        # backends and balancing: a second backend; round robin in each worker alternates,
        # so six requests (one worker gets three) reach both.
        await phases.change(backends=[{"name": "a", "url": a.url},
                                      {"name": "b", "url": b.url}])
        seen = {json.loads((await _fresh(proxy, token))[2])["backend"] for _ in range(6)}
        assert seen == {"a", "b"}
        await still_open()
        # logging: WARNING hides the INFO line of the next reload.
        await phases.change(logging={"level": "WARNING"})
        await phases.change(health_check={"timeout_seconds": 4.0})
        reloaded = [line["msg"] for line in proxy.log_lines()
                    if line.get("msg", "").startswith("config reloaded")]
        assert sum(f"(generation {phases.generation - 2})" in m for m in reloaded) == 2
        assert not any(f"(generation {phases.generation - 1})" in m for m in reloaded)
        await still_open()
        # limits: a short keep-alive timeout closes idle connections, this one included.
        await phases.change(limits={"keepalive_timeout_seconds": 1.0})
        await still_open()
        assert await kept.wait_closed_by_server(30) < 20
        # limits: a connection cap of one per worker: at most two streams at once.
        await phases.change(limits={"max_connections_per_worker": 1})

        # One after the other, each stream under way before the next connection opens (a
        # connection that has not sent its request yet counts as idle and may be evicted).
        # Raw: the refusal comes before the request is read, which aiohttp's client minds.
        streams: list[RawConnection] = []
        statuses = []
        for _ in range(4):
            streams.append(await RawConnection.open("127.0.0.1", port))
            statuses.append((await streams[-1].request(
                "POST", CHAT, b'{"stream": true}', {"Authorization": f"Bearer {token}"},
                head_only=True)).status)
        for raw in streams:
            raw.close()
        assert statuses.count(200) <= 2
        assert statuses.count(503) >= 2
        # limits: a drain delay set by reload is what SIGTERM then waits.
        await phases.change(limits={"max_connections_per_worker": 30000,
                                    "drain_delay_seconds": 5.0})
        proxy.proc.send_signal(signal.SIGTERM)
        await proxy.wait_not_ready()
        status, headers, _ = await _fresh(proxy, token)
        assert status == 200
        assert headers["Connection"] == "close"
        assert await asyncio.wait_for(proxy.proc.wait(), timeout=90) == 0
    finally:
        kept.close()
        await proxy.stop()


async def test_restart_only_change_is_logged_and_not_applied(
    tmp_path: Path, backends: list[FakeBackend]
) -> None:
    backends.append(await FakeBackend("a").start())
    port, admin = free_port(), free_port()
    config = _config(backends, port, admin)
    path = tmp_path / "proxy.yaml"
    proxy = await start_proxy(path, config, tmp_path / "proxy.log",
                              env={"GPUPROXY_JWT_SECRET": SECRET})
    try:
        phases = Phases(proxy, path, config)
        # Restart-only fields next to a reloadable one: only the latter applies.
        await phases.change(workers=3, logging={"access_log": True},
                            listen={"backlog": 128}, rate_limits={"per_ip": 700})
        for _ in range(3):
            status, headers, _ = await _fresh(proxy, _token())
            assert (status, headers["X-RateLimit-Limit"]) == (200, "700")
        stats = await proxy.stats()
        assert (stats["workers"], stats["workers_expected"]) == (2, 2)
        lines = proxy.log_lines()
        warnings = [line["msg"] for line in lines if "only a restart applies" in line["msg"]]
        assert len(warnings) == 2  # one per worker
        assert warnings[0].endswith("listen, logging.access_log, workers")
        assert not any(line.get("logger") == "gpuproxy.access" for line in lines)
    finally:
        await proxy.stop()


@pytest.mark.parametrize("enabled", [True, False])
def test_restart_key_covers_everything_when_reload_is_off(enabled: bool) -> None:
    from gpuproxy_proxy.config import restart_key

    config = ProxyConfig.model_validate({"reload": {"enabled": enabled}})
    changed = config.model_copy(update={"rate_limits": config.rate_limits.model_copy(
        update={"per_ip": 5})})
    assert (restart_key(config) != restart_key(changed)) is not enabled
