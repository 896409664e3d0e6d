"""The verified-JWT cache: hits skip verification, and no entry outlives the token's validity
(exp, TTL, secret rotation, changed claims settings or admin token)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import jwt
import pytest
from aiohttp import web

from gpuproxy_proxy.auth.authenticator import Authenticator
from gpuproxy_proxy.auth.jwt_tokens import JwtVerifier
from gpuproxy_proxy.auth.principal import Principal
from gpuproxy_proxy.auth.tokencache import VerifiedTokens
from gpuproxy_proxy.config import AuthConfig, Secrets

SECRET = "cache-secret-" + uuid.uuid4().hex
OTHER_SECRET = "other-secret-" + uuid.uuid4().hex


def token(secret: str = SECRET, **claims: Any) -> str:
    payload = {"sub": "alice", "exp": int(time.time()) + 3600} | claims
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, secret,
                      algorithm="HS256")


def authenticator(overlap: float = 0.0, leeway: int = 0, **secrets: Any) -> Authenticator:
    config = AuthConfig(jwt_rotation_overlap_seconds=overlap, jwt_leeway_seconds=leeway)
    return Authenticator(config, Secrets(jwt_secret=SECRET, **secrets), None)


def counting_verifications(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    original = JwtVerifier.verify_until

    def counted(self: JwtVerifier, tok: str) -> tuple[str, float]:
        calls.append(tok)
        return original(self, tok)

    monkeypatch.setattr(JwtVerifier, "verify_until", counted)
    return calls


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


ALICE = Principal(kind="jwt", user_id="alice")


def test_entry_expires_at_its_deadline_or_the_ttl() -> None:
    clock = Clock(1000.0)
    cache = VerifiedTokens(ttl_seconds=60.0, clock=clock)
    cache.put("short", 1010.0, ALICE)  # the token's own end comes first
    cache.put("long", 5000.0, ALICE)  # the TTL comes first
    cache.put("gone", 1000.0, ALICE)  # no validity left: not stored
    assert cache.get("gone") is None
    clock.now = 1009.9
    assert cache.get("short") is ALICE
    clock.now = 1010.0
    assert cache.get("short") is None
    assert cache.get("long") is ALICE
    clock.now = 1060.0
    assert cache.get("long") is None
    assert len(cache) == 0


def test_cache_is_bounded_and_keeps_the_newest() -> None:
    cache = VerifiedTokens(max_entries=8, clock=Clock(0.0))
    for i in range(100):
        cache.put(f"t{i}", 50.0, ALICE)
        assert len(cache) <= 8
    assert cache.get("t99") is ALICE
    assert cache.get("t0") is None


def test_verify_until_is_exp_plus_leeway_and_nothing_for_a_future_nbf() -> None:
    exp = int(time.time()) + 600
    verifier = JwtVerifier(SECRET, leeway_seconds=30)
    assert verifier.verify_until(token(exp=exp)) == ("alice", exp + 30)
    # Accepted only thanks to the leeway: no promise that it stays valid.
    early = token(nbf=int(time.time()) + 20)
    assert verifier.verify_until(early) == ("alice", 0.0)
    verifier.retire(time.time() + 5)
    assert verifier.verify_until(token(exp=exp))[1] <= time.time() + 5


async def test_same_token_is_verified_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = counting_verifications(monkeypatch)
    auth = authenticator()
    tok = token()
    first = await auth.authenticate_token(tok)
    assert first == ALICE
    for _ in range(5):
        assert await auth.authenticate_token(tok) is first
    assert calls == [tok]
    other = token(sub="bob")
    assert (await auth.authenticate_token(other)).user_id == "bob"
    assert calls == [tok, other]


async def test_future_nbf_token_is_not_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = counting_verifications(monkeypatch)
    auth = authenticator(leeway=60)
    early = token(nbf=int(time.time()) + 30)
    for _ in range(3):
        assert (await auth.authenticate_token(early)).user_id == "alice"
    assert len(calls) == 3


async def test_expired_token_is_not_served_from_the_cache() -> None:
    auth = authenticator()
    exp = int(time.time()) + 2
    tok = token(exp=exp)
    assert (await auth.authenticate_token(tok)).user_id == "alice"
    while time.time() < exp:
        assert (await auth.authenticate_token(tok)).user_id == "alice"
        time.sleep(0.05)
    with pytest.raises(web.HTTPUnauthorized):
        await auth.authenticate_token(tok)


async def test_rotation_without_overlap_invalidates_cached_tokens() -> None:
    auth = authenticator(overlap=0.0)
    old = token()
    await auth.authenticate_token(old)
    auth.rotate_jwt_secret(OTHER_SECRET)
    with pytest.raises(web.HTTPUnauthorized):
        await auth.authenticate_token(old)
    assert (await auth.authenticate_token(token(OTHER_SECRET))).user_id == "alice"


async def test_rotation_overlap_bounds_cached_tokens() -> None:
    auth = authenticator(overlap=1.0)
    old = token()
    await auth.authenticate_token(old)
    auth.rotate_jwt_secret(OTHER_SECRET)
    started = time.time()
    assert (await auth.authenticate_token(old)).user_id == "alice"  # within the overlap
    while time.time() < started + 1.2:
        time.sleep(0.05)
    with pytest.raises(web.HTTPUnauthorized):
        await auth.authenticate_token(old)


async def test_changed_claims_settings_invalidate_cached_tokens() -> None:
    auth = authenticator()
    tok = token()
    await auth.authenticate_token(tok)
    auth.reconfigure(AuthConfig(jwt_issuer="someone", jwt_rotation_overlap_seconds=0.0,
                                jwt_leeway_seconds=0))
    with pytest.raises(web.HTTPUnauthorized):
        await auth.authenticate_token(tok)  # now requires iss


async def test_a_cached_jwt_that_becomes_the_admin_token_is_refused_at_once() -> None:
    auth = authenticator(admin_token="admin-" + uuid.uuid4().hex)
    tok = token()
    assert (await auth.authenticate_token(tok)).kind == "jwt"
    auth.set_admin_token(tok)
    assert auth.is_admin_token(tok)
    with pytest.raises(web.HTTPUnauthorized):
        await auth.authenticate_token(tok)  # the admin token is never a client credential
