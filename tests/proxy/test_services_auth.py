"""API keys, JWT and the admin API against real PostgreSQL behind PgBouncer (transaction mode)."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gpuproxy_proxy.appkeys import CONFIG, METRICS, SECRETS
from gpuproxy_proxy.auth.admin import add_admin_routes
from gpuproxy_proxy.auth.apikeys import ApiKeyStore, hash_key
from gpuproxy_proxy.auth.authenticator import AUTHENTICATOR, auth_ctx
from gpuproxy_proxy.auth.jwt_tokens import InvalidToken, JwtVerifier
from gpuproxy_proxy.config import AuthConfig, DatabaseConfig, ProxyConfig, Secrets
from gpuproxy_proxy.database.migrations import MIGRATIONS, apply_migrations
from gpuproxy_proxy.database.pool import DB_POOL, Database, database_ready, db_ctx
from gpuproxy_proxy.observability.metrics import ProxyMetrics

ADMIN_TOKEN = "admin-" + uuid.uuid4().hex
JWT_SECRET = "jwt-secret-" + uuid.uuid4().hex


def make_config(pgbouncer: Any, cache_seconds: float = 30.0, **auth: Any) -> ProxyConfig:
    return ProxyConfig(
        database=DatabaseConfig(
            host=pgbouncer.host, port=pgbouncer.port, database=pgbouncer.database,
            sslmode="disable",
        ),
        auth=AuthConfig(api_key_cache_seconds=cache_seconds, **auth),
    )


def make_secrets(pgbouncer: Any) -> Secrets:
    return Secrets(
        db_user=pgbouncer.user, db_password=pgbouncer.password,
        admin_token=ADMIN_TOKEN, jwt_secret=JWT_SECRET,
    )


async def whoami(request: web.Request) -> web.Response:
    principal = await request.app[AUTHENTICATOR].authenticate(request)
    return web.json_response(
        {"kind": principal.kind, "user_id": principal.user_id, "key": principal.api_key_id}
    )


def make_app(config: ProxyConfig, secrets: Secrets) -> web.Application:
    app = web.Application()
    app[CONFIG] = config
    app[SECRETS] = secrets
    app[METRICS] = ProxyMetrics()
    app.cleanup_ctx.append(db_ctx)
    app.cleanup_ctx.append(auth_ctx)
    app.router.add_get("/whoami", whoami)
    add_admin_routes(app)
    return app


@pytest.fixture
async def client(pgbouncer_server: Any) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    app = make_app(make_config(pgbouncer_server), make_secrets(pgbouncer_server))
    async with TestClient(TestServer(app)) as c:
        yield c


def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def create_key(client: TestClient[Any, Any], user_id: str) -> dict[str, Any]:
    resp = await client.post("/admin/keys", json={"user_id": user_id, "name": "test"},
                             headers=admin_headers())
    assert resp.status == 201, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


_MIGRATE_IN_CHILD = """
import asyncio, sys
from gpuproxy_proxy.config import DatabaseConfig, Secrets
from gpuproxy_proxy.database.pool import Database

async def main() -> None:
    host, port, database, user, password = sys.argv[1:6]
    db = Database(DatabaseConfig(host=host, port=int(port), database=database, sslmode="disable"),
                  Secrets(db_user=user, db_password=password))
    await db.connect_once()
    await db.close()

asyncio.run(main())
"""


async def test_migrations_concurrent_processes_on_fresh_database(
    postgres_server: Any, pgbouncer_server: Any
) -> None:
    # A database of its own, reached through PgBouncer's wildcard entry.
    name = "mig_" + uuid.uuid4().hex[:12]
    admin = await asyncpg.connect(postgres_server.dsn.rsplit("/", 1)[0] + "/postgres")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    pgb = pgbouncer_server
    # Several proxy processes starting at once: the advisory lock serializes them.
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _MIGRATE_IN_CHILD,
            pgb.host, str(pgb.port), name, pgb.user, pgb.password,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(4)
    ]
    for child in children:
        _, err = await child.communicate()
        assert child.returncode == 0, err.decode()
    dsn = pgb.dsn.rsplit("/", 1)[0] + "/" + name
    conn = await asyncpg.connect(dsn, statement_cache_size=0)
    try:
        versions = await conn.fetch("SELECT version FROM schema_migrations ORDER BY 1")
        assert [r["version"] for r in versions] == [m[0] for m in MIGRATIONS]
        assert await apply_migrations(conn) == []  # idempotent
        tables = {r["tablename"] for r in await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert {"api_keys", "usage_records", "schema_migrations"} <= tables
    finally:
        await conn.close()


async def test_migrations_concurrent_connections(pgbouncer_server: Any) -> None:
    conns = [await asyncpg.connect(pgbouncer_server.dsn, statement_cache_size=0)
             for _ in range(4)]
    try:
        results = await asyncio.gather(*(apply_migrations(c) for c in conns))
    finally:
        for c in conns:
            await c.close()
    applied = [v for r in results for v in r]
    # Whatever was pending got applied exactly once in total.
    assert len(applied) == len(set(applied))


async def test_admin_create_list_revoke_and_lookup(
    client: TestClient[Any, Any], pgbouncer_server: Any
) -> None:
    user = "user-" + uuid.uuid4().hex
    created = await create_key(client, user)
    key = created["key"]
    assert key.startswith("gpx_")
    assert len(key) > 40
    assert created["prefix"] == key[:12]
    assert created["user_id"] == user

    # Only the hash is stored.
    conn = await asyncpg.connect(pgbouncer_server.dsn, statement_cache_size=0)
    try:
        row = await conn.fetchrow("SELECT * FROM api_keys WHERE id = $1", uuid.UUID(created["id"]))
    finally:
        await conn.close()
    assert row is not None
    assert bytes(row["key_hash"]) == hash_key(key)
    assert key not in str(dict(row))

    second = await create_key(client, user)
    resp = await client.get("/admin/keys", params={"user_id": user, "limit": "1"},
                            headers=admin_headers())
    listed = (await resp.json())["keys"]
    assert [k["id"] for k in listed] == [created["id"]]
    assert "key" not in listed[0]
    assert "key_hash" not in listed[0]

    for headers in ({"Authorization": f"Bearer {key}"}, {"X-API-Key": key}):
        resp = await client.get("/whoami", headers=headers)
        assert resp.status == 200
        assert await resp.json() == {"kind": "api_key", "user_id": user, "key": created["id"]}

    resp = await client.delete(f"/admin/keys/{created['id']}", headers=admin_headers())
    assert resp.status == 200
    assert (await resp.json())["revoked_at"] is not None
    # The revoking process drops its cache entry at once.
    resp = await client.get("/whoami", headers={"X-API-Key": key})
    assert resp.status == 403
    body = await resp.json()
    assert body["error"]["type"] == "permission_error"
    assert "revoked" in body["error"]["message"]

    resp = await client.get(
        "/admin/keys", params={"user_id": user, "include_revoked": "false"},
        headers=admin_headers(),
    )
    assert [k["id"] for k in (await resp.json())["keys"]] == [second["id"]]
    resp = await client.delete(f"/admin/keys/{uuid.uuid4()}", headers=admin_headers())
    assert resp.status == 404


async def test_admin_requires_admin_token(client: TestClient[Any, Any]) -> None:
    resp = await client.get("/admin/keys")
    assert resp.status == 401
    assert "WWW-Authenticate" in resp.headers
    resp = await client.get("/admin/keys", headers={"Authorization": "Bearer nope"})
    assert resp.status == 401
    assert (await resp.json())["error"]["type"] == "authentication_error"
    user_key = (await create_key(client, "u-" + uuid.uuid4().hex))["key"]
    resp = await client.get("/admin/keys", headers={"Authorization": f"Bearer {user_key}"})
    assert resp.status == 401
    resp = await client.get("/admin/keys", params={"limit": "0"}, headers=admin_headers())
    assert resp.status == 400
    assert "'limit'" in (await resp.json())["error"]["message"]
    resp = await client.post("/admin/keys", json={"name": "x"}, headers=admin_headers())
    assert resp.status == 400
    assert "user_id" in (await resp.json())["error"]["message"]


async def test_missing_and_invalid_credentials(client: TestClient[Any, Any]) -> None:
    resp = await client.get("/whoami")
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await resp.json())["error"]["type"] == "authentication_error"
    for headers in (
        {"X-API-Key": "gpx_" + "A" * 43},
        {"Authorization": "Bearer something-random"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
    ):
        resp = await client.get("/whoami", headers=headers)
        assert resp.status == 401, headers
        assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]


async def test_key_cache_hides_revocation_until_ttl(pgbouncer_server: Any) -> None:
    secrets = make_secrets(pgbouncer_server)
    config = make_config(pgbouncer_server).database
    assert config is not None
    db_a, db_b = Database(config, secrets), Database(config, secrets)
    await db_a.connect_once()
    await db_b.connect_once()
    try:
        # Two processes: A revokes, B has the key cached for 30 s (on a clock we control).
        now = [1000.0]
        store_a = ApiKeyStore(db_a, cache_seconds=30)
        store_b = ApiKeyStore(db_b, cache_seconds=30, clock=lambda: now[0])
        record, key = await store_a.create("u-" + uuid.uuid4().hex)
        first = await store_b.lookup(key)
        assert first is not None
        assert not first.revoked
        await store_a.revoke(record.id)
        now[0] += 29
        cached = await store_b.lookup(key)
        assert cached is not None
        assert not cached.revoked  # still cached
        now[0] += 2
        fresh = await store_b.lookup(key)
        assert fresh is not None
        assert fresh.revoked
        # Negative cache: an unknown key is answered without the database for the TTL.
        unknown = "gpx_" + uuid.uuid4().hex
        assert await store_b.lookup(unknown) is None
        await db_b.close()
        assert await store_b.lookup(unknown) is None
        # Database down and the entry expired: the stale entry beats rejecting the client.
        now[0] += 60
        stale = await store_b.lookup(key)
        assert stale is not None
        assert stale.revoked
        # Concurrent misses for one key share one query; with the database gone all fail.
        other = "gpx_other" + uuid.uuid4().hex
        results = await asyncio.gather(
            *(store_b.lookup(other) for _ in range(3)),
            return_exceptions=True,
        )
        assert all(type(r).__name__ == "DatabaseUnavailable" for r in results)
    finally:
        await db_a.close()
        await db_b.close()


async def test_database_down_at_start_then_up(pgbouncer_server: Any) -> None:
    secrets = make_secrets(pgbouncer_server)
    pgbouncer_server.stop()
    app = make_app(make_config(pgbouncer_server), secrets)
    async with TestClient(TestServer(app)) as c:
        assert not await database_ready(c.app)
        resp = await c.post("/admin/keys", json={"user_id": "x"}, headers=admin_headers())
        assert resp.status == 503
        assert "Retry-After" in resp.headers
        resp = await c.get("/whoami", headers={"X-API-Key": "gpx_" + "B" * 43})
        assert resp.status == 503
        # A malformed key needs no database to be refused.
        resp = await c.get("/whoami", headers={"X-API-Key": "gpx_short"})
        assert resp.status == 401
        pgbouncer_server.start()
        db = c.app[DB_POOL]
        assert db is not None
        assert await db.wait_connected(60)  # retry backoff (up to 10 s) + a loaded machine
        assert await database_ready(c.app)
        resp = await c.post("/admin/keys", json={"user_id": "x"}, headers=admin_headers())
        assert resp.status == 201


def token(**claims: Any) -> str:
    # Minted when the test runs, valid for an hour: a slow run cannot outlive the token.
    now = int(time.time())
    payload = {"sub": "alice", "exp": now + 3600, "iss": "issuer", "aud": "gpuproxy"} | claims
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, JWT_SECRET,
                      algorithm="HS256")


def verifier(leeway: int = 0) -> JwtVerifier:
    return JwtVerifier(JWT_SECRET, issuer="issuer", audience="gpuproxy", leeway_seconds=leeway)


def test_jwt_valid_returns_subject() -> None:
    assert verifier().verify(token()) == "alice"


# Claims are functions of the current time, called inside the test: a timestamp computed at
# collection time goes stale when the test runs minutes later (a slow, loaded CI machine).
@pytest.mark.parametrize(
    ("claims", "message"),
    [
        (lambda now: {"exp": now - 120}, "expired"),
        (lambda now: {"nbf": now + 3600}, "not valid yet"),
        (lambda now: {"iss": "someone-else"}, "issuer"),
        (lambda now: {"aud": "other"}, "audience"),
        (lambda now: {"exp": None}, "'exp'"),
        (lambda now: {"sub": None}, "'sub'"),
    ],
)
def test_jwt_rejections(claims: Callable[[int], dict[str, Any]], message: str) -> None:
    with pytest.raises(InvalidToken, match=message):
        verifier().verify(token(**claims(int(time.time()))))


def test_jwt_bad_signature_and_algorithm() -> None:
    forged = jwt.encode({"sub": "alice", "exp": int(time.time()) + 3600, "iss": "issuer",
                         "aud": "gpuproxy"}, "another-secret-of-enough-length-x", algorithm="HS256")
    with pytest.raises(InvalidToken, match="signature"):
        verifier().verify(forged)
    none_alg = jwt.encode({"sub": "alice", "exp": int(time.time()) + 3600}, None,
                          algorithm="none")
    with pytest.raises(InvalidToken):
        verifier().verify(none_alg)


def test_jwt_leeway_accepts_recently_expired() -> None:
    recently = token(exp=int(time.time()) - 5)
    # A leeway far above the 5 s: the check still passes if the machine stalls in between.
    assert verifier(leeway=600).verify(recently) == "alice"
    with pytest.raises(InvalidToken):
        verifier(leeway=0).verify(recently)


async def test_jwt_through_http(client: TestClient[Any, Any]) -> None:
    # The fixture's config has no iss/aud requirement.
    resp = await client.get("/whoami", headers={"Authorization": f"Bearer {token()}"})
    assert resp.status == 200
    assert await resp.json() == {"kind": "jwt", "user_id": "alice", "key": None}
    resp = await client.get(
        "/whoami", headers={"Authorization": f"Bearer {token(exp=int(time.time()) - 600)}"}
    )
    assert resp.status == 401
    assert "expired" in (await resp.json())["error"]["message"]
    # The admin token is never a client credential.
    resp = await client.get("/whoami", headers=admin_headers())
    assert resp.status == 401


async def test_auth_disabled_is_anonymous() -> None:
    app = web.Application()
    app[CONFIG] = ProxyConfig(auth=AuthConfig(enabled=False))
    app[SECRETS] = Secrets()
    app[METRICS] = ProxyMetrics()
    app.cleanup_ctx.append(db_ctx)
    app.cleanup_ctx.append(auth_ctx)
    app.router.add_get("/whoami", whoami)
    async with TestClient(TestServer(app)) as c:
        resp = await c.get("/whoami")
        assert await resp.json() == {"kind": "anonymous", "user_id": None, "key": None}
        assert await database_ready(c.app)


async def test_concurrent_lookups_through_pgbouncer_stay_correct(pgbouncer_server: Any) -> None:
    # Transaction pooling hands each statement to any server connection; with asyncpg's
    # statement cache off, concurrent queries from two pools must still get their own rows.
    secrets = make_secrets(pgbouncer_server)
    config = make_config(pgbouncer_server).database
    assert config is not None
    dbs = [Database(config, secrets), Database(config, secrets)]
    for db in dbs:
        await db.connect_once()
    try:
        creator = ApiKeyStore(dbs[0], cache_seconds=0)
        created = [await creator.create(f"user-{i}-{uuid.uuid4().hex}") for i in range(20)]
        stores = [ApiKeyStore(db, cache_seconds=0) for db in dbs]
        lookups = [
            stores[i % 2].lookup(created[i % 20][1]) for i in range(300)
        ]
        results = await asyncio.gather(*lookups)
        for i, record in enumerate(results):
            assert record is not None
            assert record.id == created[i % 20][0].id
    finally:
        for db in dbs:
            await db.close()
