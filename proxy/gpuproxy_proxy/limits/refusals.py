"""What a request refused by a token limit or a budget is answered: 429 with OpenAI's token
headers, or 503 while Redis cannot decide (limits/tokens.py)."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from gpuproxy_proxy.http.errors import json_error
from gpuproxy_proxy.limits.budgets import from_stored


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    kind: str  # token_limit | budget | unavailable
    scope: str
    ident: str
    limit: int
    remaining: int
    reset_seconds: int
    unit: str

    def response(self, request_id: str) -> web.Response:
        if self.kind == "unavailable":
            return json_error(503, "service_unavailable", "token limits and budgets are "
                              "unavailable (Redis unreachable); retry shortly", request_id,
                              {"Retry-After": "1"})
        retry = {"Retry-After": str(max(1, self.reset_seconds))}
        if self.kind == "budget":
            left, limit = (from_stored(max(0, self.remaining), self.unit),
                           from_stored(self.limit, self.unit))
            return json_error(429, "budget_exceeded",
                              f"the {self.unit} budget of {self.scope} {self.ident} does not "
                              f"cover this request: {left} of {limit} {self.unit} left, "
                              f"resets in {self.reset_seconds} s", request_id, retry)
        return json_error(429, "token_limit_exceeded",
                          f"token limit exceeded for {self.scope} {self.ident}: {self.limit} "
                          f"tokens per window; retry after {self.reset_seconds} s",
                          request_id, {**retry, **token_headers(self.limit, self.remaining,
                                                                self.reset_seconds)})


def token_headers(limit: int, remaining: int, reset: int) -> dict[str, str]:
    return {"X-RateLimit-Limit-Tokens": str(limit),
            "X-RateLimit-Remaining-Tokens": str(max(0, remaining)),
            "X-RateLimit-Reset-Tokens": f"{max(1, reset)}s"}
