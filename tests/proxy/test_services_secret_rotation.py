"""Secrets from files, rotated under a running proxy: the database password (in PostgreSQL, in
PgBouncer's userlist and in the file, in both orders) without one failed API-key request or
lost usage record; the JWT secret with its overlap; the admin token; the Redis password."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import jwt
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient
from tests.proxy.conftest import AdminApiFactory, ProxyFactory, proxy_config
from tests.proxy.fakes import FakeBackend
from tests.services import (
    PgBouncerServer,
    PostgresServer,
    RedisServer,
    ServiceRegistry,
    start_redis,
    write_file,
)

from gpuproxy_proxy.auth.secretfiles import read_secrets
from gpuproxy_proxy.config import ProxyConfig
from gpuproxy_proxy.database.migrations import apply_migrations
from gpuproxy_proxy.database.pool import DB_POOL, Database
from gpuproxy_proxy.limits.ratelimit import RATE_LIMITER
from gpuproxy_proxy.metering.meter import USAGE_METER

CHAT = "/v1/chat/completions"


class SecretVolume:
    """A Kubernetes Secret volume: KEY -> ..data/KEY, ..data -> ..vN, swapped in one rename."""

    def __init__(self, root: Path) -> None:
        self.root, self.version, self.values = root, 0, {}

    def path(self, key: str) -> str:
        return str(self.root / key)

    def update(self, **values: str) -> None:
        self.values = {**self.values, **values}
        self.version += 1
        data = self.root / f"..v{self.version}"
        data.mkdir()
        for key, value in self.values.items():
            (data / key).write_text(value, encoding="utf-8")
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(data.name)
        os.replace(tmp, self.root / "..data")
        for key in self.values:
            if not (self.root / key).is_symlink():
                (self.root / key).symlink_to(f"..data/{key}")


async def _until(check: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def _proxy(make_proxy: ProxyFactory, config: ProxyConfig) -> TestClient[Any, Any]:
    # As the CLI does it: the files are read once at the edge, then watched by the app.
    return await make_proxy(config, read_secrets(config.secret_files))


# --- the database password ----------------------------------------------------------------

class Role:
    """A login role of our own, in PostgreSQL and in PgBouncer's userlist (the fixtures' role
    stays untouched for the other tests)."""

    def __init__(self, postgres: PostgresServer, pgbouncer: PgBouncerServer) -> None:
        self.pg, self.pgb = postgres, pgbouncer
        self.name = f"rot_{uuid.uuid4().hex[:8]}"
        self.password = secrets.token_hex(12)

    async def _superuser(self, sql: str) -> None:
        conn = await asyncpg.connect(host=str(self.pg.socket_dir), port=self.pg.port,
                                     user=self.pg.superuser, database="postgres")
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def create(self) -> None:
        # The tables belong to the fixtures' role (the first to migrate owns them); ours
        # inherits its rights.
        conn = await asyncpg.connect(self.pgb.dsn, statement_cache_size=0)
        try:
            await apply_migrations(conn)
        finally:
            await conn.close()
        await self._superuser(f"CREATE ROLE {self.name} LOGIN PASSWORD '{self.password}'; "
                              f"GRANT {self.pg.user} TO {self.name}")  # the tables' owner
        await self.set_userlist(self.password)

    async def set_postgres_password(self, password: str) -> None:
        await self._superuser(f"ALTER ROLE {self.name} PASSWORD '{password}'")

    async def set_userlist(self, password: str | None) -> None:
        """Rewrite PgBouncer's userlist and reload it (SIGHUP to the PgBouncer we started);
        returns once PgBouncer accepts `password`."""
        lines = f'"{self.pgb.user}" "{self.pgb.password}"\n'
        if password is not None:
            lines += f'"{self.name}" "{password}"\n'
        write_file(self.pgb.workdir / "userlist.txt", lines, self.pgb.run_as)
        assert self.pgb.pid is not None
        os.kill(self.pgb.pid, signal.SIGHUP)
        if password is not None:
            await _until_login(self.pgb, self.name, password)


async def _until_login(pgb: PgBouncerServer, user: str, password: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            conn = await asyncpg.connect(host=pgb.host, port=pgb.port, user=user,
                                         password=password, database=pgb.database,
                                         ssl=False, statement_cache_size=0)
        except (OSError, asyncpg.PostgresError) as exc:
            error = exc
        else:
            await conn.close()
            return
        assert time.monotonic() < deadline, f"PgBouncer never accepted the password: {error}"
        await asyncio.sleep(0.1)


@pytest.fixture
async def role(postgres_server: PostgresServer,
               pgbouncer_server: PgBouncerServer) -> AsyncIterator[Role]:
    created = Role(postgres_server, pgbouncer_server)
    await created.create()
    yield created
    await created.set_userlist(None)  # PgBouncer's userlist as the fixture wrote it


class Traffic:
    """API-key requests one after the other (each one a database lookup: no key cache) until
    stopped; every answer and request id is kept."""

    def __init__(self, client: TestClient[Any, Any], key: str, tag: str) -> None:
        self.client, self.key, self.tag = client, key, tag
        self.statuses: list[int] = []
        self.ids: list[str] = []
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self._stop.is_set():
            rid = f"{self.tag}-{len(self.ids)}"
            self.ids.append(rid)
            resp = await self.client.post(CHAT, json={}, headers={
                "Authorization": f"Bearer {self.key}", "X-Request-ID": rid})
            await resp.read()
            self.statuses.append(resp.status)
            await asyncio.sleep(0.02)

    async def for_a_while(self, seconds: float = 1.5) -> None:
        """Let at least a few requests through (a loaded machine may take long for them)."""
        start = len(self.statuses)
        await asyncio.sleep(seconds)
        await _until(lambda: len(self.statuses) >= start + 5, "traffic stalled")

    async def stop(self) -> None:
        self._stop.set()
        await self._task


@pytest.mark.parametrize("order", ["database_first", "file_first"])
async def test_database_password_rotation_never_fails_a_request(
    order: str, tmp_path: Path, role: Role, pgbouncer_server: PgBouncerServer,
    backends: list[FakeBackend], make_proxy: ProxyFactory, make_admin_api: AdminApiFactory,
) -> None:
    backends.append(await FakeBackend("gpu").start())
    volume = SecretVolume(tmp_path)
    admin_token = secrets.token_hex(16)
    volume.update(db_user=role.name, db_password=role.password, admin_token=admin_token)
    config = proxy_config(
        backends, auth={"enabled": True, "api_key_cache_seconds": 0.0},
        database={"host": pgbouncer_server.host, "port": pgbouncer_server.port,
                  "database": pgbouncer_server.database, "sslmode": "disable",
                  # Open from the start: while PgBouncer already has the new password and the
                  # file does not yet, only connections that are logged in can serve.
                  "pool_min_size": 2, "pool_max_size": 2},
        metering={"enabled": True, "flush_interval_seconds": 0.1},
        reload={"interval_seconds": 0.1},
        secret_files={key: volume.path(key) for key in ("db_user", "db_password",
                                                        "admin_token")},
    )
    client = await _proxy(make_proxy, config)
    db: Database | None = client.app[DB_POOL]
    assert db is not None
    await _until(lambda: db.pool is not None, "the proxy never connected")
    admin_api = await make_admin_api(client)
    created = await admin_api.post("/admin/keys", json={"user_id": "rot"},
                                   headers={"Authorization": f"Bearer {admin_token}"})
    assert created.status == 201, await created.text()
    traffic = Traffic(client, (await created.json())["key"], f"rot-{uuid.uuid4().hex[:8]}")
    new_password = secrets.token_hex(12)
    try:
        await traffic.for_a_while()
        if order == "database_first":
            await role.set_postgres_password(new_password)
            await role.set_userlist(new_password)
            await traffic.for_a_while()  # served by the connections that are logged in
            volume.update(db_password=new_password)
        else:
            volume.update(db_password=new_password)
            # The proxy tries the new password, is refused, keeps the old one.
            await _until(lambda: not db.credentials_current, "the new file was not read")
            await traffic.for_a_while()
            await role.set_postgres_password(new_password)
            await role.set_userlist(new_password)
        await _until(lambda: db.credentials_current, "the proxy never switched")
        await traffic.for_a_while()
    finally:
        await traffic.stop()
    assert traffic.statuses.count(200) == len(traffic.statuses), traffic.statuses
    meter = client.app[USAGE_METER]
    await _until(lambda: meter.buffered == 0, "usage records were not written")
    assert meter.dropped == 0
    conn = await asyncpg.connect(pgbouncer_server.dsn, statement_cache_size=0)
    try:
        rows = await conn.fetch("SELECT request_id FROM usage_records WHERE request_id LIKE $1",
                                traffic.tag + "-%")
    finally:
        await conn.close()
    assert {row["request_id"] for row in rows} == set(traffic.ids)
    # The old password is gone everywhere now, and the proxy still serves on the new one.
    with pytest.raises((asyncpg.PostgresError, OSError)):
        await asyncpg.connect(host=pgbouncer_server.host, port=pgbouncer_server.port,
                              user=role.name, password=role.password,
                              database=pgbouncer_server.database, ssl=False)
    resp = await client.post(CHAT, json={}, headers={"Authorization": f"Bearer {traffic.key}"})
    assert resp.status == 200


# --- JWT secret and admin token ------------------------------------------------------------

def _jwt(secret: str, sub: str = "u1") -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 3600}, secret, algorithm="HS256")


async def _status(client: TestClient[Any, Any], token: str, path: str = CHAT) -> int:
    if path == CHAT:
        resp = await client.post(path, json={}, headers={"Authorization": f"Bearer {token}"})
    else:
        resp = await client.get(path, headers={"Authorization": f"Bearer {token}"})
    await resp.read()
    return resp.status


async def test_jwt_secret_rotation_keeps_old_tokens_for_the_overlap(
    tmp_path: Path, backends: list[FakeBackend], make_proxy: ProxyFactory
) -> None:
    backends.append(await FakeBackend("gpu").start())
    volume = SecretVolume(tmp_path)
    old, new = "old-" + secrets.token_hex(20), "new-" + secrets.token_hex(20)
    volume.update(jwt_secret=old + "\n")  # a trailing newline is not part of the secret
    overlap = 3.0
    client = await _proxy(make_proxy, proxy_config(
        backends, auth={"enabled": True, "jwt_rotation_overlap_seconds": overlap},
        reload={"interval_seconds": 0.1}, secret_files={"jwt_secret": volume.path("jwt_secret")}))
    cached, uncached = _jwt(old, "cached"), _jwt(old, "uncached")
    assert await _status(client, cached) == 200  # verified once: now in the token cache
    assert await _status(client, _jwt(new)) == 401
    updated = time.monotonic()  # the rotation happens after this: the overlap ends later
    volume.update(jwt_secret=new)
    deadline = time.monotonic() + 60
    while await _status(client, _jwt(new)) != 200:
        assert time.monotonic() < deadline, "the new JWT secret was never applied"
        await asyncio.sleep(0.05)
    rotated = time.monotonic()  # ... and before this: the overlap ends earlier
    statuses = [await _status(client, cached), await _status(client, uncached)]
    if time.monotonic() - updated < overlap:  # a slow machine may already be past it
        assert statuses == [200, 200]
    await asyncio.sleep(max(0.0, overlap - (time.monotonic() - rotated)) + 0.5)
    assert await _status(client, cached) == 401
    assert await _status(client, uncached) == 401
    assert await _status(client, _jwt(new)) == 200


async def test_admin_token_swap_applies_at_once(
    tmp_path: Path, backends: list[FakeBackend], make_proxy: ProxyFactory,
    make_admin_api: AdminApiFactory,
) -> None:
    volume = SecretVolume(tmp_path)
    old, new = secrets.token_hex(16), secrets.token_hex(16)
    volume.update(admin_token=old)
    # No database: the admin API answers 503 after the token check, 401 before it passes.
    proxy = await _proxy(make_proxy, proxy_config(
        backends, auth={"enabled": True}, reload={"interval_seconds": 0.1},
        secret_files={"admin_token": volume.path("admin_token")}))
    client = await make_admin_api(proxy)
    assert await _status(client, old, "/admin/keys") == 503
    assert await _status(client, new, "/admin/keys") == 401
    volume.update(admin_token=new)
    deadline = time.monotonic() + 60
    while await _status(client, new, "/admin/keys") != 503:
        assert time.monotonic() < deadline, "the new admin token was never applied"
        await asyncio.sleep(0.05)
    assert await _status(client, old, "/admin/keys") == 401


async def test_rotation_to_a_short_admin_token_turns_the_admin_api_off_without_a_crash(
    tmp_path: Path, backends: list[FakeBackend], make_proxy: ProxyFactory,
    make_admin_api: AdminApiFactory, caplog: pytest.LogCaptureFixture,
) -> None:
    volume = SecretVolume(tmp_path)
    good, short = secrets.token_hex(16), "s" + secrets.token_hex(15)  # 32 and 31 characters
    volume.update(admin_token=good)
    proxy = await _proxy(make_proxy, proxy_config(
        backends, auth={"enabled": True}, reload={"interval_seconds": 0.1},
        secret_files={"admin_token": volume.path("admin_token")}))
    client = await make_admin_api(proxy)
    assert await _status(client, good, "/admin/keys") == 503  # accepted (no database)
    caplog.set_level(logging.ERROR, "gpuproxy_proxy.auth.authenticator")
    volume.update(admin_token=short)
    deadline = time.monotonic() + 60
    while await _status(client, short, "/admin/keys") != 403:
        assert time.monotonic() < deadline, "the short admin token was never refused"
        await asyncio.sleep(0.05)
    resp = await client.get("/admin/keys", headers={"Authorization": f"Bearer {good}"})
    assert resp.status == 403  # the previous token is not kept either
    assert "too short" in (await resp.json())["error"]["message"]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert volume.path("admin_token") in logged, logged
    assert "31 characters" in logged
    assert "at least 32" in logged
    assert short not in logged
    # The proxy kept serving: a long token again turns the admin API back on.
    volume.update(admin_token=good)
    while await _status(client, good, "/admin/keys") != 503:
        assert time.monotonic() < deadline, "the long admin token was never applied again"
        await asyncio.sleep(0.05)


# --- the Redis password --------------------------------------------------------------------

@pytest.fixture
async def private_redis(service_registry: ServiceRegistry) -> RedisServer:
    # Our own server: setting a password must not touch the shared one.
    return start_redis(service_registry)


async def test_redis_password_rotation_reconnects(
    tmp_path: Path, private_redis: RedisServer, backends: list[FakeBackend],
    make_proxy: ProxyFactory,
) -> None:
    backends.append(await FakeBackend("gpu").start())
    old, new = secrets.token_hex(12), secrets.token_hex(12)
    admin = aioredis.Redis(host=private_redis.host, port=private_redis.port)
    try:
        await admin.config_set("requirepass", old)
        await admin.auth(old)
        volume = SecretVolume(tmp_path)
        volume.update(redis_password=old)
        client = await _proxy(make_proxy, proxy_config(
            backends, redis={"url": private_redis.url, "socket_timeout_seconds": 10},
            rate_limits={"enabled": True, "per_ip": 1000, "on_redis_failure": "closed"},
            reload={"interval_seconds": 0.1},
            secret_files={"redis_password": volume.path("redis_password")}))
        limiter = client.app[RATE_LIMITER]
        assert (await client.post(CHAT, json={})).status == 200  # closed: Redis answered
        await admin.config_set("requirepass", new)  # logged-in connections stay logged in
        volume.update(redis_password=new)
        await _until(lambda: limiter.redis_password_changes == 1, "the file was not read")
        # Every connection must log in again now: only the new password works.
        await admin.auth(new)
        await admin.client_kill_filter(_type="normal", skipme=True)
        for _ in range(5):
            assert (await client.post(CHAT, json={})).status == 200
        assert limiter.redis_ready()
    finally:
        await admin.aclose()
