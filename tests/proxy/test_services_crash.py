"""Issue 14 item 4's done-when test on the real CLI: `kill -9` of a proxy under load, then a
restart on the same spool, loses no admitted record and duplicates none (counted against the
client's log of answered requests); and a PostgreSQL outage is carried by the spool."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from tests.proxy.conftest import proxy_config
from tests.proxy.fakes import FakeBackend, free_port
from tests.proxy.procs import ProxyProcess, start_proxy

from gpuproxy_proxy.config import ProxyConfig
from gpuproxy_proxy.metering.replay import load as load_spool

CHAT = "/v1/chat/completions"


def _config(backend: FakeBackend, spool: Path, pgbouncer: Any, workers: int = 1
            ) -> ProxyConfig:
    return proxy_config([backend], workers=workers, **{
        "listen": {"host": "127.0.0.1", "port": free_port(), "admin_port": free_port()},
        "database": {"host": pgbouncer.host, "port": pgbouncer.port,
                     "database": pgbouncer.database, "sslmode": "disable"},
        "metering": {"enabled": True, "spool_dir": str(spool), "flush_interval_seconds": 0.2,
                     "progress_interval_seconds": 0.1},
    })


def _env(pgbouncer: Any) -> dict[str, str]:
    return {"GPUPROXY_DB_USER": pgbouncer.user, "GPUPROXY_DB_PASSWORD": pgbouncer.password}


async def _spooling_proxy(tmp_path: Path, backends: list[FakeBackend], pgbouncer: Any, *,
                          workers: int = 1, metering: dict[str, Any] | None = None,
                          **backend_kwargs: Any) -> tuple[ProxyProcess, Path]:
    """One fake backend and the real CLI in front of it, metering through PgBouncer onto a
    spool in `tmp_path`; returns the proxy and its spool directory."""
    backend = await FakeBackend("gpu", **backend_kwargs).start()
    backends.append(backend)
    spool = tmp_path / "spool"
    config = _config(backend, spool, pgbouncer, workers=workers)
    if metering:
        config = config.model_copy(update={
            "metering": config.metering.model_copy(update=metering)})
    proxy = await start_proxy(tmp_path / "proxy.yaml", config, tmp_path / "proxy.log",
                              env=_env(pgbouncer))
    return proxy, spool


class Client:
    """Concurrent requests, half of them streams; logs every id answered with headers 200."""

    def __init__(self, proxy: ProxyProcess, tag: str) -> None:
        self.url = proxy.url + CHAT
        self.tag = tag
        self.sent = 0
        self.accepted: list[str] = []
        self.streaming: dict[str, float] = {}  # streams under way: since when
        self.stopping = False

    def long_streams(self, seconds: float) -> int:
        now = time.monotonic()
        return sum(1 for since in self.streaming.values() if now - since >= seconds)

    async def run(self, concurrency: int) -> None:
        async with aiohttp.ClientSession() as http:
            await asyncio.gather(*(self._loop(http) for _ in range(concurrency)))

    async def _loop(self, http: aiohttp.ClientSession) -> None:
        while not self.stopping:
            self.sent += 1
            rid = f"{self.tag}-{self.sent}"
            stream = self.sent % 2 == 0
            body = json.dumps({"model": "m", "stream": stream}).encode()
            try:
                async with http.post(self.url, data=body, headers={"X-Request-ID": rid},
                                     timeout=aiohttp.ClientTimeout(total=60)) as resp:
                    if resp.status == 200:
                        self.accepted.append(rid)
                    if stream:
                        self.streaming[rid] = time.monotonic()
                    try:
                        await resp.read()
                    finally:
                        self.streaming.pop(rid, None)
            except (aiohttp.ClientError, TimeoutError):
                if self.stopping:
                    return
                await asyncio.sleep(0.05)  # the proxy is gone: do not spin until stopped


async def _rows(dsn: str, tag: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn, statement_cache_size=0)
    try:
        return await conn.fetch(
            "SELECT request_id, outcome, status, completion_tokens FROM usage_records "
            "WHERE request_id LIKE $1", tag + "-%")
    finally:
        await conn.close()


async def _wait_rows(dsn: str, tag: str, ids: set[str], seconds: float = 120.0
                     ) -> list[asyncpg.Record]:
    deadline = time.monotonic() + seconds
    while True:
        try:
            rows = await _rows(dsn, tag)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            rows = []  # PgBouncer right after PostgreSQL came back (server_login_retry)
        missing = ids - {r["request_id"] for r in rows}
        if not missing:
            return rows
        assert time.monotonic() < deadline, f"{len(missing)} accepted requests never recorded"
        await asyncio.sleep(0.2)


async def _wait(predicate: Any, what: str, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def test_kill_9_under_load_loses_and_duplicates_no_admitted_record(
    tmp_path: Path, backends: list[FakeBackend], pgbouncer_server: Any
) -> None:
    backend = await FakeBackend("gpu", chunks=20, delay=0.05).start()  # ~1 s streams
    backends.append(backend)
    spool = tmp_path / "spool"
    config = _config(backend, spool, pgbouncer_server)
    path = tmp_path / "proxy.yaml"  # the restart below reuses it, spool and all
    proxy = await start_proxy(path, config, tmp_path / "proxy.log", env=_env(pgbouncer_server))
    tag = uuid.uuid4().hex
    client = Client(proxy, tag)
    load = asyncio.create_task(client.run(concurrency=24))
    try:
        # Under load, with streams under way, and records both committed and still spooled.
        await _wait(lambda: len(client.accepted) >= 300, "the load never got going")
        # Streams long past the progress interval, so their progress lines are written.
        await _wait(lambda: client.long_streams(0.5) >= 3, "no stream ran long enough")
        await proxy.stop()  # SIGKILL: no drain, no flush
        killed_at = len(client.accepted)
    finally:
        client.stopping = True
        await load
    accepted = set(client.accepted)
    assert len(accepted) == len(client.accepted) >= killed_at
    # What the killed process left: streams admitted and never settled, at least.
    left = load_spool(sorted(spool.glob("*.seg")))
    assert any(r.outcome == "interrupted" for r in left), "the kill cut no stream"

    proxy = await start_proxy(path, config, tmp_path / "proxy2.log",
                              env=_env(pgbouncer_server))
    try:
        rows = await _wait_rows(pgbouncer_server.dsn, tag, accepted)
        ids = [r["request_id"] for r in rows]
        duplicated = {i for i in ids if ids.count(i) > 1}
        assert not duplicated, f"recorded twice: {sorted(duplicated)[:5]}"
        outcomes = {r["request_id"]: r["outcome"] for r in rows}
        interrupted = [r for r in rows if r["outcome"] == "interrupted"]
        # Streams cut by the kill are settled as interrupted, with the events counted.
        assert interrupted, "no stream was cut by the kill"
        assert any((r["completion_tokens"] or 0) > 0 for r in interrupted)
        assert sum(o == "complete" for o in outcomes.values()) > 200
        # Only ids the client sent; the ones never answered may be recorded (admitted, then
        # cut before their headers), at most once.
        assert set(ids) <= {f"{tag}-{n}" for n in range(1, client.sent + 1)}
        # The dead spool was replayed and deleted (just after its last commit); only the new
        # process's files remain.
        await _wait(lambda: len({p.name.split(".", 1)[0] for p in spool.iterdir()}) == 1,
                    "the dead spool was not deleted after its replay")
        print(f"accepted {len(accepted)}, rows {len(rows)}, interrupted {len(interrupted)}, "
              f"left in the spool at the kill {len(left)}")
    finally:
        await proxy.stop()


async def test_a_killed_worker_is_replayed_by_its_replacement(
    tmp_path: Path, backends: list[FakeBackend], pgbouncer_server: Any
) -> None:
    # Two workers share the spool directory; one is SIGKILLed under load, the supervisor
    # starts another, which replays the dead worker's spool while its sibling serves on.
    proxy, spool = await _spooling_proxy(tmp_path, backends, pgbouncer_server, workers=2,
                                         chunks=20, delay=0.05)
    tag = uuid.uuid4().hex
    client = Client(proxy, tag)
    load = asyncio.create_task(client.run(concurrency=24))
    try:
        await _wait(lambda: len(client.accepted) >= 300, "the load never got going")
        stats = await proxy.stats()
        victim, index = stats["per_worker"][0]["pid"], stats["per_worker"][0]["worker"]
        os.kill(victim, signal.SIGKILL)
        await proxy.wait_for(
            lambda s: len(s["per_worker"]) == 2
            and victim not in {w["pid"] for w in s["per_worker"]},
            "the killed worker was not replaced")
        more = len(client.accepted) + 100
        await _wait(lambda: len(client.accepted) >= more, "the load stopped after the kill")
    finally:
        client.stopping = True
        await load
    try:
        rows = await _wait_rows(pgbouncer_server.dsn, tag, set(client.accepted))
        ids = [r["request_id"] for r in rows]
        assert len(ids) == len(set(ids)), "a record was written twice"
        assert any(r["outcome"] == "interrupted" for r in rows)
        # Replayed by the replacement: no file of the dead worker is left.
        await _wait(lambda: not any(p.name.startswith(f"w{index}-{victim}-")
                                    for p in spool.iterdir()),
                    "the dead worker's spool was not replayed")
    finally:
        await proxy.stop()


async def _metric(proxy: ProxyProcess, name: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(proxy.admin + "/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def test_postgres_outage_requests_admitted_into_the_spool_all_rows_arrive(
    tmp_path: Path, backends: list[FakeBackend], postgres_server: Any, pgbouncer_server: Any
) -> None:
    proxy, _ = await _spooling_proxy(tmp_path, backends, pgbouncer_server)
    tag = uuid.uuid4().hex
    try:
        postgres_server.stop()
        try:
            client = Client(proxy, tag)
            load = asyncio.create_task(client.run(concurrency=8))
            await _wait(lambda: len(client.accepted) >= 200, "requests stopped being admitted")
            client.stopping = True
            await load
            assert await _metric(proxy, "gpuproxy_metering_spool_bytes") > 0
            assert await _metric(proxy, "gpuproxy_metering_spool_oldest_seconds") > 0
        finally:
            postgres_server.start()
        rows = await _wait_rows(pgbouncer_server.dsn, tag, set(client.accepted))
        assert len(rows) == len({r["request_id"] for r in rows})
        assert {r["outcome"] for r in rows} == {"complete"}
        # Committed segments are deleted: the spool drains back to (nearly) nothing.
        deadline = time.monotonic() + 120
        while await _metric(proxy, "gpuproxy_metering_spool_bytes") > 64 * 1024:
            assert time.monotonic() < deadline, "the spool never drained"
            await asyncio.sleep(0.2)
    finally:
        await proxy.stop()


async def test_spool_full_rejects_with_503_until_the_database_takes_the_records(
    tmp_path: Path, backends: list[FakeBackend], postgres_server: Any, pgbouncer_server: Any
) -> None:
    proxy, _ = await _spooling_proxy(tmp_path, backends, pgbouncer_server, metering={
        "spool_max_bytes": 64 * 1024, "on_spool_full": "reject"})
    tag = uuid.uuid4().hex
    accepted: list[str] = []
    try:
        postgres_server.stop()
        try:
            async with aiohttp.ClientSession() as http:
                for n in range(5000):
                    rid = f"{tag}-{n}"
                    async with http.post(proxy.url + CHAT, data=b'{"model": "m"}',
                                         headers={"X-Request-ID": rid}) as resp:
                        body = await resp.read()
                        if resp.status == 503:
                            assert b"metering_unavailable" in body
                            assert resp.headers["Retry-After"] == "5"
                            break
                        assert resp.status == 200
                        accepted.append(rid)
                else:
                    raise AssertionError("a 64 KiB spool never filled")
            assert 50 < len(accepted) < 1000
            assert await _metric(proxy, "gpuproxy_metering_spool_bytes") >= 64 * 1024
        finally:
            postgres_server.start()
        rows = await _wait_rows(pgbouncer_server.dsn, tag, set(accepted))
        assert {r["request_id"] for r in rows if r["status"] == 200} == set(accepted)
        # Committed and rotated away, the spool takes requests again.
        deadline = time.monotonic() + 120
        async with aiohttp.ClientSession() as http:
            while True:
                async with http.post(proxy.url + CHAT, data=b"{}") as resp:
                    await resp.read()
                    if resp.status == 200:
                        break
                assert time.monotonic() < deadline, "the spool never drained"
                await asyncio.sleep(0.2)
    finally:
        await proxy.stop()


async def test_a_clean_stop_commits_everything_and_leaves_no_spool(
    tmp_path: Path, backends: list[FakeBackend], pgbouncer_server: Any
) -> None:
    proxy, spool = await _spooling_proxy(tmp_path, backends, pgbouncer_server, workers=2,
                                         chunks=5, delay=0.05)
    tag = uuid.uuid4().hex
    client = Client(proxy, tag)
    load = asyncio.create_task(client.run(concurrency=8))
    try:
        await _wait(lambda: len(client.accepted) >= 100, "the load never got going")
    finally:
        client.stopping = True
        await load
    try:
        proxy.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(120):
            assert await proxy.proc.wait() == 0
    finally:
        await proxy.stop()
    rows = await _wait_rows(pgbouncer_server.dsn, tag, set(client.accepted), seconds=5)
    assert {r["outcome"] for r in rows} == {"complete"}
    assert list(spool.iterdir()) == []  # nothing left for a replay, not even a lock file
