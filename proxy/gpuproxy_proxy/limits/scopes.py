"""Which scopes one client's request counts against, built once per (address, principal) with
its share of the Redis batch command already encoded, instead of on every request."""

from __future__ import annotations

from dataclasses import dataclass

from gpuproxy_proxy.auth.principal import Principal
from gpuproxy_proxy.config import RateLimitConfig
from gpuproxy_proxy.http.clientaddr import ip_scope_key
from gpuproxy_proxy.limits.window import Scope

DEFAULT_MAX_ENTRIES = 50_000


def bulk(raw: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(raw), raw)


# A request's part of EVALSHA's KEYS (one bulk per scope key) and of its ARGV (the scope
# count, then one bulk per limit), as RESP.
Fragments = tuple[bytes, bytes]


@dataclass(frozen=True, slots=True)
class ScopeSet:
    """The scopes in order, and their RESP fragments for the batch command."""

    scopes: tuple[Scope, ...]
    resp: Fragments

    @classmethod
    def of(cls, scopes: tuple[Scope, ...]) -> ScopeSet:
        # surrogatepass: any str a principal carries encodes (injectively), so one odd
        # subject can never fail its request, nor the batch it would join.
        keys = b"".join(bulk(s.key.encode("utf-8", "surrogatepass")) for s in scopes)
        args = bulk(b"%d" % len(scopes)) + b"".join(bulk(b"%d" % s.limit) for s in scopes)
        return cls(scopes, (keys, args))


def build_scopes(config: RateLimitConfig, ip: str, principal: Principal) -> tuple[Scope, ...]:
    scopes = [Scope("ip", "rl:ip:" + ip_scope_key(ip), config.per_ip)]
    if principal.user_id is not None:
        scopes.append(Scope("user", "rl:user:" + principal.user_id, config.per_user))
    if principal.api_key_id is not None:
        scopes.append(Scope("api_key", "rl:key:" + principal.api_key_id, config.per_api_key))
    return tuple(scopes)


def lookup_scope(config: RateLimitConfig, ip: str) -> Scope:
    """An API-key query on behalf of `ip`: a quota of its own, as large as the IP's request
    quota, charged before the query (failed credentials are charged to the IP after)."""
    return Scope("key_lookup", "rl:lookup:" + ip_scope_key(ip), config.per_ip)


class ScopeSets:
    """(client address, user, API key) -> ScopeSet under one config; bounded. The owner calls
    `reset(config)` when the limits change."""

    __slots__ = ("_config", "_entries", "_lookups", "_max")

    def __init__(self, config: RateLimitConfig, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self._config = config
        self._max = max_entries
        self._entries: dict[tuple[str, str | None, str | None], ScopeSet] = {}
        self._lookups: dict[str, ScopeSet] = {}

    def reset(self, config: RateLimitConfig) -> None:
        self._config = config
        self._entries = {}
        self._lookups = {}

    def lookup(self, ip: str) -> ScopeSet:
        """The one scope an API-key query on behalf of `ip` counts against."""
        found = self._lookups.get(ip)
        if found is None:
            found = ScopeSet.of((lookup_scope(self._config, ip),))
            if len(self._lookups) >= self._max:
                self._lookups = {}
            self._lookups[ip] = found
        return found

    def get(self, ip: str, principal: Principal) -> ScopeSet:
        key = (ip, principal.user_id, principal.api_key_id)
        found = self._entries.get(key)
        if found is None:
            found = ScopeSet.of(build_scopes(self._config, ip, principal))
            if len(self._entries) >= self._max:
                # Many distinct clients: start afresh rather than track recency per hit.
                self._entries = {}
            self._entries[key] = found
        return found

    def __len__(self) -> int:
        return len(self._entries)
