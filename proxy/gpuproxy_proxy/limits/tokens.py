"""Token limits and budgets on the request path: one Redis script call at admission reserves
the request's tokens (and price) in every applicable window and budget, or in none; one at
the end settles the reservation with the real usage; a stream past its reservation asks for
more at most once a second, and is cut when a budget refuses."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import NoScriptError, RedisError

from gpuproxy_proxy.appkeys import CONFIG, METRICS
from gpuproxy_proxy.auth.principal import Principal
from gpuproxy_proxy.config import ProxyConfig
from gpuproxy_proxy.database.pool import DB_POOL
from gpuproxy_proxy.limits.budgets import BudgetDatabaseUnavailable, BudgetStore
from gpuproxy_proxy.limits.ratelimit import RATE_LIMITER, RateLimiter
from gpuproxy_proxy.limits.refusals import Refusal, token_headers
from gpuproxy_proxy.limits.reservation import (
    LocalTokenWindows,
    Request,
    budget_base,
    cost_micro_usd,
    parse_request,
    price_for,
    scope_ids,
    settle_delta,
    window_scopes,
)
from gpuproxy_proxy.limits.token_lua import RESERVE_LUA, SETTLE_LUA
from gpuproxy_proxy.metering.usage import Usage
from gpuproxy_proxy.observability.metrics import ProxyMetrics

log = logging.getLogger(__name__)

_FAILURES = (RedisError, OSError, TimeoutError)
_SHAS = {script: hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()
         for script in (RESERVE_LUA, SETTLE_LUA)}
TOKEN_ROUTES = frozenset({"chat_completions", "completions", "embeddings"})


@dataclass(slots=True)
class Admission:
    """One admitted request's reservation, to be settled once."""

    request_id: str
    request: Request
    micro_usd: int
    windows: list[str] = field(default_factory=list)  # concrete window keys
    # (scope, id, period prefix, unit) of each budget that applies
    budgets: list[tuple[str, str, str, str]] = field(default_factory=list)
    budget_bases: list[str] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    reserved_tokens: int = 0  # what the budgets hold for this request (grows as it streams)
    settled: bool = False
    cut_message: str = ""


class TokenGate:
    def __init__(self, config: ProxyConfig, limiter: RateLimiter, budgets: BudgetStore,
                 metrics: ProxyMetrics | None) -> None:
        self._limiter = limiter
        self.budgets = budgets
        self._local = LocalTokenWindows()
        self._tasks: set[asyncio.Task[None]] = set()
        self._token_rejections = {s: metrics.token_limit_rejections.labels(s)
                                  for s in ("api_key", "user", "team")} if metrics else {}
        self._budget_rejections = {s: metrics.budget_rejections.labels(s)
                                   for s in ("api_key", "user", "team")} if metrics else {}
        self._cuts = metrics.budget_stream_cuts if metrics else None
        self.reconfigure(config)

    def reconfigure(self, config: ProxyConfig) -> None:
        self.config = config
        rl = config.rate_limits
        self.limits_on = rl.enabled and (rl.tokens_per_minute.any or rl.tokens_per_day.any)
        self.budgets_on = config.budgets.enabled and config.redis is not None
        self.active = self.limits_on or self.budgets_on
        # A reservation outlives the longest request, so a running one is never released
        # (each stream extension restarts its clock).
        self._ttl_ms = int(1000 * max(config.budgets.reservation_ttl_seconds,
                                      config.upstream.max_request_seconds + 60))

    def _redis(self) -> aioredis.Redis | None:
        return self._limiter.redis_client

    @property
    def redis_client(self) -> aioredis.Redis | None:
        return self._limiter.redis_client

    async def admit(self, route: str, principal: Principal, body: bytes,
                    request_id: str) -> Admission | Refusal | None:
        """None: nothing to reserve (no scope, not a token route)."""
        if route not in TOKEN_ROUTES:
            return None
        rl = self.config.rate_limits
        plan = window_scopes(rl, principal) if self.limits_on else []
        idents = scope_ids(principal) if self.budgets_on else []
        if not plan and not idents:
            return None
        req = parse_request(route, body, rl.default_max_tokens)
        price = price_for(self.config.budgets, req.model)
        adm = Admission(request_id, req, cost_micro_usd(price, req.prompt_tokens,
                                                        req.max_completion_tokens))
        adm.budget_bases = [budget_base(s, i) for s, i in idents]
        client = self._redis()
        if client is None:
            # No Redis configured (budgets need it): per-process windows, as request limits.
            return self._local_windows(principal, plan, adm)
        if not self._limiter.redis_ready():
            return self._fallback(principal, plan, idents, adm)
        try:
            reply = await self._reserve(client, plan, adm.budget_bases, adm, adm.request.tokens,
                                        adm.micro_usd)
        except _FAILURES as exc:
            self._limiter.mark_down(exc)
            return self._fallback(principal, plan, idents, adm)
        allowed, denied, entries = reply
        if allowed != 1:
            i = denied - 1
            key, cur, limit, reset, unit = entries[i]
            if i < len(plan):
                scope = plan[i][0]
                ident = _ident_of(principal, scope)
                counter = self._token_rejections.get(scope)
                refusal = Refusal(429, "token_limit", scope, ident, limit, limit - cur, reset,
                                  "tokens")
            else:
                scope, ident = idents[i - len(plan)]
                counter = self._budget_rejections.get(scope)
                refusal = Refusal(429, "budget", scope, ident, limit, limit - cur, reset, unit)
            if counter is not None:
                counter.inc()
            return refusal
        tightest: tuple[int, int, int] | None = None
        for i, (key, cur, limit, reset, unit) in enumerate(entries):
            if i < len(plan):
                adm.windows.append(key)
                if tightest is None or limit - cur < tightest[1]:
                    tightest = (limit, limit - cur, reset)
            elif key:
                scope, ident = idents[i - len(plan)]
                adm.budgets.append((scope, ident, key, unit))
        adm.reserved_tokens = adm.request.tokens
        if tightest is not None:
            adm.headers = token_headers(*tightest)
        return adm

    async def _reserve(
        self, client: aioredis.Redis, plan: list[tuple[str, str, int, int]],
        bases: list[str], adm: Admission, tokens: int, micro_usd: int,
    ) -> tuple[int, int, list[tuple[str, int, int, int, str]]]:
        keys = [p[1] for p in plan] + bases
        args: list[str | int] = [len(plan), len(bases), adm.request_id, tokens, micro_usd,
                                 self._ttl_ms]
        for _, _, seconds, limit in plan:
            args += [seconds, limit]
        for _ in range(2):
            raw = await self._script(client, RESERVE_LUA, keys, args)
            if int(raw[0]) != -1:
                break
            try:  # Redis lost them (a restart, an eviction): PostgreSQL has them
                await self.budgets.load_into_redis(client)
            except BudgetDatabaseUnavailable as exc:
                # Unknown budgets are not assumed absent: the caller's fallback decides.
                raise ConnectionError(f"budgets not in Redis and not loadable: {exc}") from exc
        else:
            raise ConnectionError("budgets could not be loaded into Redis")
        entries = []
        for j in range(2, len(raw), 5):
            key = raw[j].decode() if isinstance(raw[j], bytes) else str(raw[j])
            unit = raw[j + 4].decode() if isinstance(raw[j + 4], bytes) else str(raw[j + 4])
            entries.append((key, int(raw[j + 1]), int(raw[j + 2]), int(raw[j + 3]), unit))
        return int(raw[0]), int(raw[1]), entries

    async def _script(self, client: aioredis.Redis, script: str, keys: list[str],
                      args: list[str | int]) -> list[Any]:
        timeout = self.config.redis.socket_timeout_seconds if self.config.redis else 1.0
        sha = _SHAS[script]
        async with asyncio.timeout(timeout * 4):
            try:
                raw = await client.evalsha(sha, len(keys), *keys, *args)
            except NoScriptError:
                # First use, or Redis restarted: NOSCRIPT means nothing ran, so resend once.
                await client.script_load(script)
                raw = await client.evalsha(sha, len(keys), *keys, *args)
        return list(raw)

    def _fallback(self, principal: Principal, plan: list[tuple[str, str, int, int]],
                  idents: list[tuple[str, str]], adm: Admission) -> Admission | Refusal:
        """Redis is unreachable: on_redis_failure decides, as for request limits."""
        mode = self.config.rate_limits.on_redis_failure
        # Budgets cannot be checked per process without spending them N times over: they
        # admit only when failing open.
        if mode == "closed" or (idents and mode != "open"):
            return Refusal(503, "unavailable", "", "", 0, 0, 1, "")
        if mode == "local":
            return self._local_windows(principal, plan, adm)
        return adm  # open: nothing in Redis to settle

    def _local_windows(self, principal: Principal, plan: list[tuple[str, str, int, int]],
                       adm: Admission) -> Admission | Refusal:
        i = self._local.reserve(plan, adm.request.tokens) if plan else -1
        if i < 0:
            return adm  # charged with the reservation (no settle: the counts are per process)
        scope, _, seconds, limit = plan[i]
        counter = self._token_rejections.get(scope)
        if counter is not None:
            counter.inc()
        return Refusal(429, "token_limit", scope, _ident_of(principal, scope), limit, 0,
                       seconds, "tokens")

    def settle(self, adm: Admission, usage: Usage | None, cut: bool = False) -> None:
        """At the response's end: the real usage replaces the reservation (in the background,
        so the answer is not held by Redis)."""
        if adm.settled or (not adm.windows and not adm.budgets):
            return
        adm.settled = True
        task = asyncio.create_task(self._settle(adm, usage))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle(self, adm: Admission, usage: Usage | None) -> None:
        prompt, completion = adm.request.prompt_tokens, 0
        if usage is not None:
            prompt = usage.prompt_tokens or 0
            completion = usage.completion_tokens or 0
            if usage.total_tokens is not None and not usage.completion_tokens:
                completion = max(0, usage.total_tokens - prompt)
        actual = prompt + completion
        price = price_for(self.config.budgets, adm.request.model)
        spend = [actual if unit != "usd" else cost_micro_usd(price, prompt, completion)
                 for _, _, _, unit in adm.budgets]
        keys = adm.windows + [b[2] for b in adm.budgets]
        args: list[str | int] = [len(adm.windows), len(adm.budgets), adm.request_id,
                                 settle_delta(adm.request.tokens, actual), *spend]
        client = self._redis()
        if client is None:
            return
        try:
            await self._script(client, SETTLE_LUA, keys, args)
        except _FAILURES as exc:
            # The budget's reservation expires after reservation_ttl_seconds instead.
            log.warning("settling request %s in Redis failed (%s: %s)", adm.request_id,
                        type(exc).__name__, exc)

    def stream_check_due(self, adm: Admission, completion_so_far: int) -> bool:
        """Cheap, per chunk: the stream has used up what it reserved in its budgets (then one
        Redis call reserves `stream_extend_tokens` more: at most one call per that many)."""
        return bool(adm.budgets) and \
            adm.request.prompt_tokens + completion_so_far >= adm.reserved_tokens

    async def extend(self, adm: Admission, completion_so_far: int) -> bool:
        """The stream needs more than it reserved: reserve another step in every budget (or
        none). False: a budget is spent, the stream must end (adm.cut_message says why)."""
        step = self.config.budgets.stream_extend_tokens
        need = adm.request.prompt_tokens + completion_so_far - adm.reserved_tokens + step
        price = price_for(self.config.budgets, adm.request.model)
        client = self._redis()
        if client is None:
            return True
        try:
            allowed, denied, _ = await self._reserve(
                client, [], [budget_base(b[0], b[1]) for b in adm.budgets], adm, need,
                cost_micro_usd(price, 0, need))
        except _FAILURES:
            return True  # the settle counts what was streamed; do not cut on an outage
        if allowed == 1:
            adm.reserved_tokens += need
            return True
        scope, ident, _, unit = adm.budgets[min(denied, len(adm.budgets)) - 1]
        adm.cut_message = (f"the {unit} budget of {scope} {ident} was reached; the response "
                           "was ended")
        if self._cuts is not None:
            self._cuts.inc()
        return False

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)


def _ident_of(principal: Principal, scope: str) -> str:
    return {"api_key": principal.api_key_id, "user": principal.user_id,
            "team": principal.team}.get(scope) or ""


TOKEN_GATE = web.AppKey("token_gate", TokenGate)
BUDGET_STORE = web.AppKey("budget_store", BudgetStore)


async def tokens_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: after the rate limiter (whose Redis client it shares) and the database."""
    config = app[CONFIG]
    budgets = BudgetStore(app[DB_POOL])
    app[BUDGET_STORE] = budgets
    gate = TokenGate(config, app[RATE_LIMITER], budgets, app[METRICS])
    app[TOKEN_GATE] = gate
    try:
        yield
    finally:
        await gate.close()
