"""Scope sets built once per client: the same scopes and the same Redis command bytes as
building them per request, rebuilt when the limits change, bounded."""

from __future__ import annotations

import asyncio
import random
from typing import Any, Literal

from gpuproxy_proxy.auth.principal import ANONYMOUS, Principal
from gpuproxy_proxy.config import RateLimitConfig, Secrets
from gpuproxy_proxy.limits.batch import pack_batch
from gpuproxy_proxy.limits.ratelimit import RateLimiter
from gpuproxy_proxy.limits.scopes import ScopeSet, ScopeSets, build_scopes
from gpuproxy_proxy.limits.window import Scope, decide

USER = Principal(kind="jwt", user_id="alice")
KEY = Principal(kind="api_key", user_id="bob", api_key_id="k-1")


def resp_command(*parts: bytes) -> bytes:
    """A RESP array of bulk strings, written out the plain way."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


def test_pack_batch_matches_the_plain_resp_encoding() -> None:
    config = RateLimitConfig(per_ip=7, per_user=8, per_api_key=9)
    requests = [("192.0.2.1", ANONYMOUS), ("192.0.2.2", USER), ("2001:db8::1", KEY)]
    sets = [ScopeSet.of(build_scopes(config, ip, p)) for ip, p in requests]
    batch: list[Any] = [(len(s.scopes), s.resp, None) for s in sets]
    keys = [sc.key.encode() for s in sets for sc in s.scopes]
    args = [b"60", b"3"]
    for s in sets:
        args.append(b"%d" % len(s.scopes))
        args.extend(b"%d" % sc.limit for sc in s.scopes)
    expected = resp_command(b"EVALSHA", b"f" * 40, b"%d" % len(keys), *keys, *args)
    assert pack_batch(b"f" * 40, 60, batch) == expected


def test_scope_sets_reuse_per_client_and_follow_new_limits() -> None:
    sets = ScopeSets(RateLimitConfig(per_ip=5, per_user=6))
    first = sets.get("192.0.2.1", USER)
    assert sets.get("192.0.2.1", Principal(kind="jwt", user_id="alice")) is first
    assert [(s.name, s.key, s.limit) for s in first.scopes] == [
        ("ip", "rl:ip:192.0.2.1", 5), ("user", "rl:user:alice", 6)]
    assert sets.get("192.0.2.2", USER) is not first
    assert [s.name for s in sets.get("192.0.2.1", KEY).scopes] == ["ip", "user", "api_key"]
    sets.reset(RateLimitConfig(per_ip=50, per_user=60))
    assert [s.limit for s in sets.get("192.0.2.1", USER).scopes] == [50, 60]


def test_scope_sets_are_bounded() -> None:
    sets = ScopeSets(RateLimitConfig(), max_entries=16)
    for i in range(200):
        sets.get(f"10.0.{i // 256}.{i % 256}", ANONYMOUS)
        assert len(sets) <= 16


def test_reload_applies_new_limits_to_known_clients() -> None:
    async def run() -> list[bool]:
        rl = RateLimiter(RateLimitConfig(per_ip=2), None, Secrets())
        out = [(await rl.check("192.0.2.9", ANONYMOUS)).allowed for _ in range(3)]
        rl.reconfigure(RateLimitConfig(per_ip=100))
        out.append((await rl.check("192.0.2.9", ANONYMOUS)).allowed)
        assert (await rl.check("192.0.2.9", ANONYMOUS)).limit == 100
        await rl.close()
        return out

    assert asyncio.run(run()) == [True, True, False, True]


def reference_allowed(scopes: list[Scope], elapsed: int, counts: list[tuple[int, int]],
                      window: int) -> tuple[int, int, str]:
    """The allowed-path rule: the scope with the fewest remaining, then the lowest limit."""
    weight = (window - elapsed) / window
    ranked = [(max(0, int((s.limit - (prev * weight + cur)) // 1)), s.limit, i)
              for i, (s, (cur, prev)) in enumerate(zip(scopes, counts, strict=True))]
    remaining, limit, index = min(ranked)
    return remaining, limit, scopes[index].name


def test_decide_allowed_picks_the_tightest_scope() -> None:
    rng = random.Random(7)
    names: tuple[Literal["ip", "user", "api_key"], ...] = ("ip", "user", "api_key")
    for _ in range(500):
        n = rng.randint(1, 3)
        scopes = [Scope(names[i], f"k{i}", rng.randint(1, 50)) for i in range(n)]
        counts = [(rng.randint(0, 60), rng.randint(0, 60)) for _ in range(n)]
        elapsed = rng.randint(0, 59_999)
        d = decide(scopes, True, elapsed, counts, 60_000, "redis")
        assert d.allowed
        assert d.retry_after_seconds == 0
        assert (d.remaining, d.limit, d.scope) == reference_allowed(scopes, elapsed, counts,
                                                                    60_000)
