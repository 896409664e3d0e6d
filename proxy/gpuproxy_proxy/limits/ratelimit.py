"""Rate limiting per client IP, user and API key: one Redis Lua call per request, with a
fallback (in-process limiter, fail open, or fail closed) while Redis is unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace

import redis.asyncio as aioredis
from aiohttp import web
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gpuproxy_proxy.appkeys import CONFIG, METRICS, SECRETS
from gpuproxy_proxy.auth.principal import Principal
from gpuproxy_proxy.config import RateLimitConfig, RedisConfig, Secrets
from gpuproxy_proxy.http.clientaddr import IPNetwork, client_ip, parse_networks
from gpuproxy_proxy.http.errors import json_error
from gpuproxy_proxy.http.request import ClientRequest
from gpuproxy_proxy.limits.batch import ScriptBatcher
from gpuproxy_proxy.limits.scopes import ScopeSet, ScopeSets, build_scopes
from gpuproxy_proxy.limits.window import (
    UNLIMITED,
    LocalWindowLimiter,
    RateLimitDecision,
    Scope,
    decide,
)
from gpuproxy_proxy.observability.metrics import ProxyMetrics

__all__ = [
    "RATE_LIMITER",
    "RateLimitDecision",
    "RateLimited",
    "RateLimiter",
    "client_ip",
    "rate_limit_headers",
    "rate_limit_response",
    "ratelimit_ctx",
]

log = logging.getLogger(__name__)

# The batcher keeps at most two script calls on the wire, plus the outage probe.
_REDIS_MAX_CONNECTIONS = 8
_PROBE_INTERVAL_SECONDS = 1.0
# A replaced client is closed this much later, so the calls already sent on it complete.
_RETIRE_DELAY_SECONDS = 2.0
_MAX_DENIED = 100_000
_FAILURES = (RedisError, OSError, TimeoutError)


class RateLimited(Exception):
    """Raised through code that does not answer requests itself (the API-key lookup quota)."""

    def __init__(self, decision: RateLimitDecision) -> None:
        super().__init__(f"rate limit exceeded for scope {decision.scope!r}")
        self.decision = decision


def rate_limit_headers(decision: RateLimitDecision) -> dict[str, str]:
    if decision.limit == 0:
        return {}
    headers = {
        "X-RateLimit-Limit": str(decision.limit),
        "X-RateLimit-Remaining": str(decision.remaining),
        "X-RateLimit-Reset": str(decision.reset_seconds),
    }
    if not decision.allowed:
        headers["Retry-After"] = str(decision.retry_after_seconds)
    return headers


def rate_limit_response(decision: RateLimitDecision, request_id: str) -> web.Response:
    """The rejection: 429 naming the scope, or 503 when failing closed without Redis."""
    if decision.status == 503:
        return json_error(
            503, "service_unavailable",
            "rate limiting is unavailable (Redis unreachable); retry shortly", request_id,
            {"Retry-After": str(decision.retry_after_seconds)},
        )
    return json_error(
        decision.status, "rate_limit_exceeded",
        f"rate limit exceeded for scope '{decision.scope}': {decision.limit} requests per "
        f"window; retry after {decision.retry_after_seconds} s", request_id,
        rate_limit_headers(decision),
    )


class RateLimiter:
    """Limits, window, trusted proxies and failure mode change live (`reconfigure`); a new
    Redis password (rotated secret file) swaps in a freshly connected client."""

    def __init__(
        self,
        config: RateLimitConfig,
        redis_config: RedisConfig | None,
        secrets: Secrets,
        metrics: ProxyMetrics | None = None,
    ) -> None:
        self.config = config
        self._metrics = metrics
        # Label children bound once: .labels() is a locked dict lookup per call otherwise.
        self._rejections = {
            scope: metrics.ratelimit_rejections.labels(scope)
            for scope in ("ip", "user", "api_key", "key_lookup")
        } if metrics is not None else {}
        self._redis_config = redis_config
        self._redis: aioredis.Redis | None = None
        self._timeout = 0.0 if redis_config is None else redis_config.socket_timeout_seconds
        self._down = False
        self._probe: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self.redis_password_changes = 0
        # Scope key -> (monotonic time until which it is over its limit, end of its window,
        # its rejection).
        # A client told to retry after N seconds is answered locally until then, so a flood
        # from one client costs this process a dict lookup instead of a Redis call.
        self._denied: dict[str, tuple[float, float, RateLimitDecision]] = {}
        self._scope_sets = ScopeSets(config)
        self._apply(config)
        if redis_config is not None:
            self._redis, self._batcher = self._connect(secrets.redis_password)

    def _apply(self, config: RateLimitConfig) -> None:
        self.config = config
        self.trusted: tuple[IPNetwork, ...] = parse_networks(tuple(config.trusted_proxies))
        self._fallbacks = (
            self._metrics.ratelimit_fallback.labels(config.on_redis_failure)
            if self._metrics is not None else None
        )
        self._window_ms = config.window_seconds * 1000
        self._local = LocalWindowLimiter(config.window_seconds)
        self._scope_sets.reset(config)

    def _connect(self, password: str | None) -> tuple[aioredis.Redis, ScriptBatcher]:
        assert self._redis_config is not None
        pool = aioredis.BlockingConnectionPool.from_url(
            self._redis_config.url,
            max_connections=_REDIS_MAX_CONNECTIONS,
            timeout=self._timeout,
            password=password,
            socket_timeout=self._timeout,
            socket_connect_timeout=self._timeout,
            # Fail fast: the fallback limiter, not a retry loop, handles an outage.
            retry=Retry(NoBackoff(), 0),
        )
        client = aioredis.Redis(connection_pool=pool)
        return client, ScriptBatcher(client, self.config.window_seconds, self._timeout)

    def reconfigure(self, config: RateLimitConfig) -> None:
        """A config reload. Changed limits or window start the in-process counters afresh and
        forget cached rejections (they were decided under the old limits)."""
        old = self.config
        if old == config:
            return
        self._apply(config)
        self._denied.clear()
        if self._redis is not None and old.window_seconds != config.window_seconds:
            self._batcher.window_seconds = config.window_seconds

    def set_redis_password(self, password: str | None) -> None:
        """A rotated password: new connections log in with it; the old client finishes what it
        has on the wire and is closed a little later."""
        if self._redis is None:
            return
        old = (self._redis, self._batcher)
        self._redis, self._batcher = self._connect(password)
        task = asyncio.create_task(self._retire(*old), name="redis-retire-client")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        self.redis_password_changes += 1
        log.warning("Redis password changed; reconnecting with the new one")

    async def _retire(self, client: aioredis.Redis, batcher: ScriptBatcher) -> None:
        await asyncio.sleep(_RETIRE_DELAY_SECONDS)
        await _close_client(client, batcher)

    @property
    def redis_client(self) -> aioredis.Redis | None:
        """The current client (token limits and budgets share it, and its rotations)."""
        return self._redis

    def mark_down(self, exc: BaseException) -> None:
        """Another user of the client saw Redis fail: fall back until the probe sees it."""
        self._mark_down(exc)

    @property
    def uses_redis(self) -> bool:
        return self._redis is not None

    def client_ip(self, request: ClientRequest) -> str:
        if not self.trusted:
            return request.remote or ""  # the common case, without the general walk
        return client_ip(request, self.trusted)

    def redis_ready(self) -> bool:
        """False while Redis is configured but unreachable; True when not configured."""
        return self._redis is None or not self._down

    def scopes(self, ip: str, principal: Principal) -> list[Scope]:
        return list(build_scopes(self.config, ip, principal))

    async def check(self, client_ip: str, principal: Principal) -> RateLimitDecision:
        if not self.config.enabled:
            return UNLIMITED
        return await self._check(self._scope_sets.get(client_ip, principal))

    async def check_lookup(self, client_ip: str) -> RateLimitDecision:
        """Charge one API-key database query to `client_ip` (see scopes.lookup_scope)."""
        if not self.config.enabled:
            return UNLIMITED
        return await self._check(self._scope_sets.lookup(client_ip))

    async def _check(self, scope_set: ScopeSet) -> RateLimitDecision:
        scopes = scope_set.scopes
        if self._redis is None:
            return self._count(self._local.check(scopes))
        if self._denied:
            denied = self._still_denied(scopes)
            if denied is not None:
                return self._count(denied)
        if self._down:
            return self._fallback(scopes)
        try:
            elapsed, raw = await self._batcher.call(len(scopes), scope_set.resp)
        except _FAILURES as exc:
            self._mark_down(exc)
            return self._fallback(scopes)
        counts = list(zip(raw[1::2], raw[2::2], strict=True))
        decision = decide(scopes, raw[0] == 1, elapsed, counts, self._window_ms, "redis")
        if not decision.allowed:
            self._deny(scopes, decision)
        return self._count(decision)

    def _deny(self, scopes: Sequence[Scope], decision: RateLimitDecision) -> None:
        key = next(s.key for s in scopes if s.name == decision.scope)
        now = time.monotonic()
        if len(self._denied) >= _MAX_DENIED:
            self._denied = {k: v for k, v in self._denied.items() if v[0] > now}
            if len(self._denied) >= _MAX_DENIED:
                return  # a flood of distinct clients: Redis answers them as usual
        # Retry-After was rounded up to whole seconds: deny only for the part that is certain.
        until = now + decision.retry_after_seconds - 1
        if until > now:
            self._denied[key] = (until, now + decision.reset_seconds, decision)

    def _still_denied(self, scopes: Sequence[Scope]) -> RateLimitDecision | None:
        now = time.monotonic()
        for scope in scopes:
            entry = self._denied.get(scope.key)
            if entry is None:
                continue
            until, window_end, decision = entry
            if until <= now:
                del self._denied[scope.key]
                continue
            return replace(
                decision,
                retry_after_seconds=max(1, math.ceil(until - now)),
                reset_seconds=max(1, math.ceil(window_end - now)),
            )
        return None

    def _count(self, decision: RateLimitDecision) -> RateLimitDecision:
        if not decision.allowed:
            counter = self._rejections.get(decision.scope)
            if counter is not None:
                counter.inc()
        return decision

    def _fallback(self, scopes: Sequence[Scope]) -> RateLimitDecision:
        mode = self.config.on_redis_failure
        if self._fallbacks is not None:
            self._fallbacks.inc()
        if mode == "local":
            return self._count(self._local.check(scopes))
        if mode == "open":
            return RateLimitDecision(True, 0, 0, 0, 0, "", "open")
        return RateLimitDecision(False, 0, 0, 0, 1, "", "closed")

    def _mark_down(self, exc: BaseException) -> None:
        if self._down:
            return
        self._down = True
        # Logged once per outage; the probe logs the recovery.
        log.warning(
            "Redis unreachable (%s: %s); rate limiting falls back to %r until it returns",
            type(exc).__name__, exc, self.config.on_redis_failure,
        )
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._probe_until_up(), name="redis-probe")

    async def _probe_until_up(self) -> None:
        assert self._redis is not None
        while self._down:
            await asyncio.sleep(_PROBE_INTERVAL_SECONDS)
            try:
                async with asyncio.timeout(self._timeout * 2):
                    await self._redis.ping()
            except _FAILURES:
                continue
            self._down = False
            log.warning("Redis reachable again; rate limiting uses Redis")

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        if self._redis is not None:
            await _close_client(self._redis, self._batcher)


async def _close_client(client: aioredis.Redis, batcher: ScriptBatcher) -> None:
    await batcher.close()
    await client.aclose()
    await client.connection_pool.disconnect()


RATE_LIMITER = web.AppKey("rate_limiter", RateLimiter)


async def ratelimit_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    limiter = RateLimiter(config.rate_limits, config.redis, app[SECRETS], app[METRICS])
    app[RATE_LIMITER] = limiter
    try:
        yield
    finally:
        await limiter.close()
