"""End to end with real services: the CLI with two workers, Redis rate limits and metering into
PostgreSQL through PgBouncer; SIGTERM during streams -> they complete and every usage record is
in the database (the buffer is flushed on shutdown)."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import yaml
from tests.proxy.conftest import proxy_config
from tests.proxy.fakes import FakeBackend, free_port, wait_ready

pytestmark = pytest.mark.services


async def test_sigterm_flushes_every_usage_record(
    tmp_path: Path, backends: list[FakeBackend], redis_server: Any, pgbouncer_server: Any
) -> None:
    backends.append(await FakeBackend("gpu", chunks=6, delay=0.2).start())
    port, admin_port = free_port(), free_port()
    config = proxy_config(
        backends,
        listen={"host": "127.0.0.1", "port": port, "admin_port": admin_port},
        # Not the 0.25 s product default: a slow answer on a loaded machine would fall back.
        redis={"url": redis_server.url, "socket_timeout_seconds": 10},
        rate_limits={"enabled": True, "per_ip": 1000},
        database={"host": pgbouncer_server.host, "port": pgbouncer_server.port,
                  "database": pgbouncer_server.database, "sslmode": "disable"},
        # Nothing is written before shutdown: only the drain's flush can store the records.
        metering={"enabled": True, "batch_size": 10000, "flush_interval_seconds": 600},
        limits={"shutdown_grace_seconds": 60},
    )
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")), encoding="utf-8")
    env = {**os.environ, "GPUPROXY_DB_USER": pgbouncer_server.user,
           "GPUPROXY_DB_PASSWORD": pgbouncer_server.password}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gpuproxy_proxy.cli", "--config", str(path), "--workers", "2",
        env=env, stderr=(tmp_path / "proxy.log").open("w"))
    tag = f"e2e-{uuid.uuid4().hex[:8]}"
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        await wait_ready(f"http://127.0.0.1:{admin_port}", proc)
        async with aiohttp.ClientSession() as http:
            for i in range(4):
                rid = {"X-Request-ID": f"{tag}-plain-{i}"}
                async with http.post(url, json={}, headers=rid) as r:
                    assert r.status == 200
                    assert r.headers["X-RateLimit-Limit"] == "1000"
            streams = [await http.post(url, json={"stream": True},
                                       headers={"X-Request-ID": f"{tag}-stream-{i}"})
                       for i in range(6)]
            for resp in streams:
                assert (await resp.content.readline()).startswith(b"data: ")
            proc.send_signal(signal.SIGTERM)
            for resp in streams:
                assert (await resp.read()).rstrip().endswith(b"data: [DONE]")
        assert await asyncio.wait_for(proc.wait(), timeout=120) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    conn = await asyncpg.connect(pgbouncer_server.dsn, statement_cache_size=0)
    try:
        rows = await conn.fetch(
            "SELECT request_id, status, backend, route, prompt_tokens, completion_tokens "
            "FROM usage_records WHERE request_id LIKE $1", tag + "-%")
    finally:
        await conn.close()
    by_id = {row["request_id"]: row for row in rows}
    assert len(by_id) == 10
    for i in range(6):
        row = by_id[f"{tag}-stream-{i}"]
        assert (row["status"], row["backend"], row["route"]) == (200, "gpu", "chat_completions")
        assert (row["prompt_tokens"], row["completion_tokens"]) == (5, 6)
    assert by_id[f"{tag}-plain-0"]["completion_tokens"] == 3


async def test_rate_limit_is_shared_by_the_workers(
    tmp_path: Path, backends: list[FakeBackend], redis_server: Any
) -> None:
    backends.append(await FakeBackend("gpu").start())
    port, admin_port = free_port(), free_port()
    config = proxy_config(
        backends,
        listen={"host": "127.0.0.1", "port": port, "admin_port": admin_port},
        # A slow Redis answer must not fall back to per-worker counting, and an hour-long window
        # cannot roll over (and forgive requests) while a slow run is under way.
        redis={"url": redis_server.url, "socket_timeout_seconds": 10},
        rate_limits={"enabled": True, "per_ip": 6, "window_seconds": 3600},
    )
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")), encoding="utf-8")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gpuproxy_proxy.cli", "--config", str(path), "--workers", "2",
        stderr=(tmp_path / "proxy.log").open("w"))
    try:
        await wait_ready(f"http://127.0.0.1:{admin_port}", proc)
        # A source address of our own: other tests' requests do not count against its limit.
        octets = [secrets.randbelow(250) + 1 for _ in range(3)]
        source = "127." + ".".join(map(str, octets))
        statuses = []
        for _ in range(12):  # a new connection each: the kernel spreads them over both workers
            connector = aiohttp.TCPConnector(local_addr=(source, 0))
            async with aiohttp.ClientSession(connector=connector) as http, http.post(
                f"http://127.0.0.1:{port}/v1/chat/completions", json={},
                headers={"Connection": "close"},
            ) as resp:
                statuses.append(resp.status)
                if resp.status == 429:
                    assert int(resp.headers["Retry-After"]) >= 1
                    assert (await resp.json())["error"]["type"] == "rate_limit_exceeded"
        assert statuses.count(200) == 6
        assert statuses.count(429) == 6
        async with aiohttp.ClientSession() as http, http.get(
            f"http://127.0.0.1:{admin_port}/metrics"
        ) as resp:
            text = await resp.text()
        assert 'gpuproxy_ratelimit_rejections_total{scope="ip"} 6.0' in text
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=60) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
