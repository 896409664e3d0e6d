"""The client-facing request path: request id, admission, auth, rate limit, forward, meter.

One `Pipeline` per process, built after the services' cleanup contexts ran, so the hot path
only reads attributes it resolved once (no AppKey lookups, cached metric children).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from gpuproxy_proxy.appkeys import METRICS
from gpuproxy_proxy.auth.authenticator import AUTHENTICATOR
from gpuproxy_proxy.auth.principal import ANONYMOUS
from gpuproxy_proxy.config import ProxyConfig
from gpuproxy_proxy.http.errors import body_too_large, json_error
from gpuproxy_proxy.http.exceptions import with_request_id
from gpuproxy_proxy.http.request import BodyTooLarge, ClientRequest, Request
from gpuproxy_proxy.http.response import Answer, Response
from gpuproxy_proxy.limits.ratelimit import (
    RATE_LIMITER,
    RateLimited,
    rate_limit_headers,
    rate_limit_response,
)
from gpuproxy_proxy.limits.refusals import Refusal
from gpuproxy_proxy.limits.tokens import TOKEN_GATE, Admission
from gpuproxy_proxy.metering.estimate import estimate_usage
from gpuproxy_proxy.metering.meter import USAGE_METER, SpoolFull, UsageRecord
from gpuproxy_proxy.metering.spend import MAX_MODEL_CHARS, SpendCounters, request_model
from gpuproxy_proxy.metering.usage import Usage
from gpuproxy_proxy.routing.admission import ADMISSION, PRIORITY_HEADER, AdmissionQueue, tenant_of
from gpuproxy_proxy.routing.backends import BackendState
from gpuproxy_proxy.routing.retry import Retrying
from gpuproxy_proxy.runtime import RUNTIME
from gpuproxy_proxy.upstream.forward import (
    UPSTREAM_POOLS,
    UPSTREAM_SESSION,
    Outcome,
    end_overlong,
    forward,
    forward_headers,
    trusted_networks,
)
from gpuproxy_proxy.upstream.stream_options import with_stream_usage

ROUTES = ("chat_completions", "completions", "embeddings", "models", "other")
_CODE_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
# Routes whose streams are asked for their usage event (upstream/stream_options.py).
_STREAMED = frozenset({"chat_completions", "completions"})
# Routes that spend tokens: an answer without usage gets an estimate (metering/estimate.py).
_TOKEN_ROUTES = ("chat_completions", "completions", "embeddings")


_NO_USAGE = Usage(0, 0, 0)


class Pipeline:
    """Everything the request path needs, resolved once per process (and again on reload)."""

    def __init__(self, app: web.Application) -> None:
        metrics = app[METRICS]
        self.app = app
        self.runtime = app[RUNTIME]
        self.session = app[UPSTREAM_SESSION]
        self.pools = app[UPSTREAM_POOLS]
        self.auth = app[AUTHENTICATOR]
        self.limiter = app[RATE_LIMITER]
        self.meter = app[USAGE_METER]
        self.tokens = app[TOKEN_GATE]
        self.spend = SpendCounters(metrics.spend_usd, metrics.tokens,
                                   self.runtime.config.budgets)
        config = self.runtime.config
        self.retries = Retrying(config.upstream.retry)
        self.admission = AdmissionQueue(config.admission, metrics, config.workers)
        app[ADMISSION] = self.admission
        self.reconfigure(config)
        # Read at scrape time: no locked inc/dec on every request.
        metrics.requests_in_flight.set_function(self._in_flight_now)
        self.rejected_in_flight = metrics.connections_rejected.labels("in_flight")
        self.counters = {
            (route, cls): metrics.requests_total.labels(route, cls)
            for route in ROUTES for cls in _CODE_CLASSES
        }
        self.failed = {route: metrics.requests_failed.labels(route) for route in ROUTES}
        self.durations = {route: metrics.request_duration_ms.labels(route) for route in ROUTES}
        self.estimated = {route: metrics.tokens_estimated.labels(route) for route in _TOKEN_ROUTES}

    def reconfigure(self, config: ProxyConfig) -> None:
        """The settings the hot path reads as plain attributes (a config reload)."""
        self.rate_limits_on = config.rate_limits.enabled
        # Mirrors UsageMeter: without a database nothing is recorded, so build no records.
        self.metering_on = config.metering.enabled and config.database is not None
        # Token limits and budgets settle with the real usage: it is read from the answers.
        self.tokens_on = self.tokens.active
        self.max_in_flight = config.limits.max_in_flight_per_worker
        self.max_body = config.limits.max_body_bytes
        self.strip_credentials = config.auth.enabled
        self.max_request_seconds = config.upstream.max_request_seconds
        self.spend.configure(config.budgets)
        self.retries.configure(config.upstream.retry)
        self.admission.configure(config.admission, config.workers)
        self.admission_on = config.admission.enabled

    def _in_flight_now(self) -> float:
        return float(self.runtime.in_flight)

    async def handle(self, request: Request, route: str) -> Answer:
        runtime = self.runtime
        request_id = request.request_id
        if runtime.in_flight >= self.max_in_flight:
            # Fast refusal: queueing more work would only make every request slow.
            self.rejected_in_flight.inc()
            self.counters[route, "5xx"].inc()
            self.failed[route].inc()
            return json_error(503, "overloaded", "the proxy is at its in-flight request limit; "
                              "retry shortly", request_id, {"Retry-After": "1"})
        started = time.monotonic()
        started_unix = time.time()
        runtime.in_flight += 1
        outcome = Outcome()
        limit = self.max_request_seconds
        try:
            if not limit:
                return await self._serve(request, route, request_id, outcome)
            deadline = asyncio.timeout(limit)
            try:
                async with deadline:
                    return await self._serve(request, route, request_id, outcome)
            except TimeoutError:
                if not deadline.expired():
                    raise
                return await end_overlong(request, outcome, request_id, limit)
        except asyncio.CancelledError:
            if not outcome.status:
                outcome.status = 499  # nginx's code for "client closed request"
            raise
        finally:
            runtime.in_flight -= 1
            self._account(route, request_id, outcome, started, started_unix)

    async def _serve(self, request: Request, route: str, request_id: str,
                     outcome: Outcome) -> Answer:
        try:
            outcome.principal = await self.auth.authenticate(request, self._admit_lookup)
        except RateLimited as exc:
            outcome.status = exc.decision.status
            return rate_limit_response(exc.decision, request_id)
        except web.HTTPException as exc:
            # Failed credentials still spend the client IP's quota, so guessing keys is
            # throttled like any other traffic instead of reaching the database unchecked.
            if exc.status == 401 and self.rate_limits_on:
                decision = await self.limiter.check(self.limiter.client_ip(request), ANONYMOUS)
                if not decision.allowed:
                    outcome.status = decision.status
                    return rate_limit_response(decision, request_id)
            outcome.status = exc.status
            with_request_id(exc, request_id)
            raise
        limit_headers: dict[str, str] = {}
        if self.rate_limits_on:
            decision = await self.limiter.check(self.limiter.client_ip(request),
                                                outcome.principal)
            limit_headers = rate_limit_headers(decision)
            if not decision.allowed:
                outcome.status = decision.status
                return rate_limit_response(decision, request_id)
        length = request.content_length
        if length is not None and length > self.max_body:
            outcome.status = 413
            return body_too_large(self.max_body, request_id, limit_headers)
        body = b""
        if request.body_exists:
            try:
                body = await request.read()
            except BodyTooLarge:
                outcome.status = 413
                return body_too_large(self.max_body, request_id, limit_headers)
        outcome.bytes_in = len(body)
        if self.tokens_on and request.method == "POST":
            admitted = await self.tokens.admit(route, outcome.principal, body, request_id)
            if isinstance(admitted, Refusal):
                outcome.status = admitted.status
                return admitted.response(request_id)
            if isinstance(admitted, Admission):
                outcome.admission = admitted
                outcome.gate = self.tokens
                if admitted.headers:
                    limit_headers = {**limit_headers, **admitted.headers}
        usage_on = self.metering_on or self.tokens_on
        if usage_on and route in _STREAMED and request.method == "POST":
            body, outcome.strip_usage = with_stream_usage(body)
        outcome.body = body
        if route == "models":
            return await self.models(request, request_id, outcome, limit_headers)
        if self.metering_on:
            admission = outcome.admission
            outcome.model = (request_model(body) if admission is None
                             else admission.request.model[:MAX_MODEL_CHARS] or None)
            try:
                outcome.ticket = self.meter.admit(request_id, outcome.principal, route,
                                                  outcome.bytes_in, outcome.model)
            except SpoolFull:
                outcome.status = 503
                return json_error(503, "metering_unavailable",
                                  "usage cannot be recorded right now (the metering spool is "
                                  "full); retry later", request_id,
                                  {**limit_headers, "Retry-After": "5"})
        # --- admission hook (routing/admission.py): O(1) and no await while a backend has room
        queue = self.admission
        if not self.admission_on:
            return await forward(request, self.runtime, self.pools, body, request_id, outcome,
                                 limit_headers, self.strip_credentials, usage_on, self.retries)
        if not queue.fast(self.runtime.pool):
            principal = outcome.principal
            refused = await queue.wait(
                self.runtime.pool, tenant_of(principal, self.limiter.client_ip(request)),
                queue.priority_of(principal, request.headers.get(PRIORITY_HEADER)),
                request_id)
            if refused is not None:
                outcome.status = refused.status
                return refused
        pool = self.runtime.pool
        try:
            return await forward(request, self.runtime, self.pools, body, request_id, outcome,
                                 limit_headers, self.strip_credentials, usage_on, self.retries,
                                 queue.saturated_names(pool))
        finally:
            queue.release(self.runtime.pool)

    async def _admit_lookup(self, request: ClientRequest) -> None:
        """Before an API key is looked up in the database: one IP sending random keys gets
        429 once its lookup quota is spent, instead of one query per request."""
        if self.rate_limits_on:
            decision = await self.limiter.check_lookup(self.limiter.client_ip(request))
            if not decision.allowed:
                raise RateLimited(decision)

    def _account(self, route: str, request_id: str, outcome: Outcome,
                 started: float, started_unix: float) -> None:
        status = outcome.status or 500
        duration_ms = (time.monotonic() - started) * 1000.0
        cls = _CODE_CLASSES[min(max(status // 100, 1), 5) - 1]
        self.counters[route, cls].inc()
        if status >= 500:
            self.failed[route].inc()
        self.durations[route].observe(duration_ms)
        admission = outcome.admission
        if not self.metering_on and admission is None:
            return
        usage = outcome.usage
        if usage is None and 200 <= status < 300 and route in self.estimated:
            usage = estimate_usage(route, outcome.body, outcome.watch)
            self.estimated[route].inc(usage.total_tokens or 0)
        principal = outcome.principal
        if admission is not None:
            # Not answered (an error, or cut before the backend said anything): what streamed
            # is estimated; nothing at all costs nothing.
            if usage is None and outcome.watch is not None:
                usage = estimate_usage(route, outcome.body, outcome.watch)
            self.tokens.settle(admission, usage if usage is not None else _NO_USAGE)
        if usage is not None:
            model = outcome.model
            if model is None and admission is not None:
                model = admission.request.model or None
            self.spend.count(principal.team, model, usage)
        if not self.metering_on:
            return
        self.meter.record(UsageRecord(
            request_id=request_id,
            principal_kind=principal.kind,
            user_id=principal.user_id,
            api_key_id=principal.api_key_id,
            backend=outcome.backend,
            route=route,
            status=status,
            bytes_in=outcome.bytes_in,
            bytes_out=outcome.bytes_out,
            duration_ms=duration_ms,
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None,
            total_tokens=usage.total_tokens if usage else None,
            estimated=usage.estimated if usage else False,
            created_unix=started_unix,
            model=outcome.model,
            team=principal.team,
        ), outcome.ticket)

    async def models(self, request: Request, request_id: str, outcome: Outcome,
                     headers: dict[str, str]) -> Answer:
        """The union of the healthy backends' /v1/models, de-duplicated by model id."""
        now = time.monotonic()
        config = self.runtime.config
        backends = [b for b in self.runtime.pool.backends if b.available(now)]
        fwd = forward_headers(request, request_id, self.strip_credentials,
                              trusted_networks(config))
        timeout = aiohttp.ClientTimeout(
            total=config.upstream.connect_timeout_seconds + config.health_check.timeout_seconds
        )
        results = await asyncio.gather(
            *(self._backend_models(b, fwd, timeout) for b in backends)
        )
        seen: set[str] = set()
        merged: list[dict[str, Any]] = []
        answered = 0
        for entries in results:
            if entries is None:
                continue
            answered += 1
            for entry in entries:
                model_id = entry.get("id")
                if isinstance(model_id, str) and model_id not in seen:
                    seen.add(model_id)
                    merged.append(entry)
        if not answered:
            outcome.status = 502
            return json_error(502, "upstream_unavailable",
                              "no healthy backend answered GET /v1/models", request_id, headers)
        outcome.status = 200
        payload = json.dumps({"object": "list", "data": merged}).encode()
        outcome.bytes_out = len(payload)
        return Response(200, payload, headers=[*headers.items(), ("X-Request-ID", request_id)],
                        content_type="application/json")

    async def _backend_models(
        self, backend: BackendState, headers: Any, limit: aiohttp.ClientTimeout
    ) -> list[dict[str, Any]] | None:
        try:
            async with self.session.get(
                backend.upstream_url("/v1/models"), headers=headers, timeout=limit,
                allow_redirects=False,
            ) as resp:
                if resp.status != 200:
                    return None
                data = json.loads(await resp.read())
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None
        items = data.get("data") if isinstance(data, dict) else None
        if not isinstance(items, list):
            return None
        return [item for item in items if isinstance(item, dict)]


PIPELINE = web.AppKey("pipeline", Pipeline)


async def pipeline_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: must run after the auth, rate-limit, metering and upstream contexts."""
    app[PIPELINE] = Pipeline(app)
    yield
