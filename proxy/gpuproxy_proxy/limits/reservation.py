"""The pure parts of token limits and budgets: what a request reserves, what it costs, which
scopes it counts against, and the per-process windows used without Redis (no I/O here;
limits/tokens.py does the Redis calls)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

from gpuproxy_proxy.auth.principal import Principal
from gpuproxy_proxy.config import BudgetsConfig, ModelPrice, RateLimitConfig
from gpuproxy_proxy.metering.estimate import prompt_tokens, tokens_for_chars

# Scope names as the admin API and the metrics spell them, and their Redis key parts.
SCOPES = ("api_key", "user", "team")
_KEY_PART = {"api_key": "key", "user": "user", "team": "team"}
WINDOWS = (("minute", 60), ("day", 86400))


@dataclass(frozen=True, slots=True)
class Request:
    """What admission needs from a request body."""

    model: str
    prompt_tokens: int  # estimated
    max_completion_tokens: int  # max_tokens (times n), or the configured default

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.max_completion_tokens


def parse_request(route: str, body: bytes, default_max_tokens: int) -> Request:
    try:
        data = json.loads(body) if body else None
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return Request("", tokens_for_chars(len(body)), 0 if route == "embeddings"
                       else default_max_tokens)
    model = data.get("model")
    prompt = prompt_tokens(route, data)
    if route == "embeddings":
        return Request(model if isinstance(model, str) else "", prompt, 0)
    limit = data.get("max_completion_tokens") or data.get("max_tokens")
    n = data.get("n") or 1
    if not (isinstance(n, int) and not isinstance(n, bool) and n > 0):
        n = 1
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
        completion = limit * n
    else:
        completion = default_max_tokens * n
    return Request(model if isinstance(model, str) else "", prompt, completion)


def price_for(config: BudgetsConfig, model: str) -> ModelPrice:
    return config.prices.get(model) or config.default_price


def cost_micro_usd(price: ModelPrice, prompt: int, completion: int) -> int:
    """A price per 1M tokens in USD is the price per token in micro-USD; rounded up, so a
    budget is never undercharged by rounding."""
    return math.ceil(prompt * price.input + completion * price.output - 1e-9)


def scope_ids(principal: Principal) -> list[tuple[str, str]]:
    """(scope, id) for each scope the principal has."""
    out = []
    if principal.api_key_id is not None:
        out.append(("api_key", principal.api_key_id))
    if principal.user_id is not None:
        out.append(("user", principal.user_id))
    if principal.team is not None:
        out.append(("team", principal.team))
    return out


def window_scopes(config: RateLimitConfig,
                  principal: Principal) -> list[tuple[str, str, int, int]]:
    """(scope, Redis key base, window seconds, limit) of every token limit that applies."""
    out = []
    for window, seconds in WINDOWS:
        limits = config.tokens_per_minute if window == "minute" else config.tokens_per_day
        for scope, ident in scope_ids(principal):
            limit = getattr(limits, "per_" + scope)
            if limit:
                out.append((scope, f"tl:{_KEY_PART[scope]}:{ident}:{window[0]}", seconds,
                            limit))
    return out


def budget_base(scope: str, ident: str) -> str:
    return f"bg:{_KEY_PART[scope]}:{ident}"


def settle_delta(reserved: int, actual: int) -> int:
    """What settling adds to a token window: negative is a refund."""
    return actual - reserved


class LocalTokenWindows:
    """Per-process fixed windows while Redis is down (on_redis_failure: local)."""

    def __init__(self, max_keys: int = 100_000) -> None:
        self._counts: dict[str, int] = {}
        self._max = max_keys

    def reserve(self, plan: list[tuple[str, str, int, int]], tokens: int) -> int:
        """Index of the first window over its limit, or -1 (then all are charged)."""
        now = int(time.time())
        keys = [f"{base}:{now // seconds}" for _, base, seconds, _ in plan]
        for i, (key, (_, _, _, limit)) in enumerate(zip(keys, plan, strict=True)):
            if self._counts.get(key, 0) + tokens > limit:
                return i
        if len(self._counts) > self._max:
            self._counts.clear()
        for key in keys:
            self._counts[key] = self._counts.get(key, 0) + tokens
        return -1
