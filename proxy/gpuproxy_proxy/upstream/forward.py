"""Forwarding to a backend: pooled protocol-level connections, header hygiene, streaming, retries.

Responses are written chunk by chunk as they arrive; only small JSON bodies with a known length
are read whole (one write, and their `usage` can be parsed). A connection failure or a 429/503
answer, before any byte was sent, is retried on another backend (routing/retry.py). The aiohttp
session is kept for the cold paths (/v1/models aggregation); health checks have their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from gpuproxy_proxy.appkeys import CONFIG, METRICS
from gpuproxy_proxy.auth.principal import ANONYMOUS, Principal
from gpuproxy_proxy.config import ProxyConfig
from gpuproxy_proxy.http.clientaddr import IPNetwork, parse_networks, peer_trusted
from gpuproxy_proxy.http.errors import error_body, json_error
from gpuproxy_proxy.http.request import ClientRequest, Request
from gpuproxy_proxy.http.response import Answer, Response, StreamResponse
from gpuproxy_proxy.metering.durable import Ticket
from gpuproxy_proxy.metering.estimate import completion_tokens_for
from gpuproxy_proxy.metering.usage import Usage
from gpuproxy_proxy.metering.watch import UsageWatch, usage_watch
from gpuproxy_proxy.observability.metrics import ProxyMetrics
from gpuproxy_proxy.routing.backends import BackendPool, BackendState
from gpuproxy_proxy.routing.hints import RequestHints
from gpuproxy_proxy.routing.retry import Retrying, pick
from gpuproxy_proxy.runtime import Runtime
from gpuproxy_proxy.upstream.framing import ResponseHead
from gpuproxy_proxy.upstream.pool import (
    UpstreamConnectError,
    UpstreamConnection,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamPools,
    UpstreamReadTimeout,
)

if TYPE_CHECKING:
    from gpuproxy_proxy.limits.tokens import Admission, TokenGate

log = logging.getLogger("gpuproxy.upstream")

UPSTREAM_SESSION = web.AppKey("upstream_session", aiohttp.ClientSession)
UPSTREAM_POOLS = web.AppKey("upstream_pools", UpstreamPools)

# RFC 9110 7.6.1 hop-by-hop headers, plus ones the client library recomputes itself.
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "host", "content-length", "expect",
})
_CREDENTIALS = frozenset({"authorization", "x-api-key"})
_REPLACED = frozenset({"x-forwarded-for", "x-request-id", "x-forwarded-proto"})
# What a client says about where it connects from: believed (passed on) only from a trusted
# proxy, else dropped, so a backend never sees an address or host the client chose.
_PROXY_INFO = frozenset({"forwarded", "x-forwarded-host", "x-real-ip"})
# forward_pairs' skip sets as bytes, for forward_head's raw header names: (trusted peer,
# strip credentials) -> names.
_SKIP_RAW_TRUSTED = frozenset(name.encode() for name in _HOP_BY_HOP | _REPLACED)
_SKIP_RAW_SETS = {
    (True, False): _SKIP_RAW_TRUSTED,
    (True, True): _SKIP_RAW_TRUSTED | {name.encode() for name in _CREDENTIALS},
    (False, False): _SKIP_RAW_TRUSTED | {name.encode() for name in _PROXY_INFO},
    (False, True): _SKIP_RAW_TRUSTED | {name.encode() for name in _PROXY_INFO | _CREDENTIALS},
}
_RESPONSE_SKIP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "content-length",
})
_RESPONSE_SKIP_OURS = _RESPONSE_SKIP | {"x-request-id"}
# The skip set per set of our own header names: the same few (rate-limit headers) every time.
_SKIP_FOR_EXTRA: dict[tuple[str, ...], frozenset[str]] = {}
# Small bodies of known length are read whole: one write downstream and cheap usage parsing.
_BUFFER_LIMIT = 64 * 1024
# aiohttp's client sent an explicit zero length for these methods; backends may insist on it.
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# The cold paths' own bound per backend, apart from upstream.max_connections_per_backend (which
# a reload changes on the forward path's pools): they never take the forward path's slots.
_COLD_PATH_PER_BACKEND = 64
# Writing the final SSE error event of a request cut at upstream.max_request_seconds.
_END_WRITE_SECONDS = 5.0


@dataclass(slots=True)
class Outcome:
    """What the metering record and the metrics need to know about one forwarded request."""

    status: int = 0
    backend: str | None = None
    principal: Principal = ANONYMOUS
    bytes_in: int = 0
    bytes_out: int = 0
    usage: Usage | None = None
    # Set before forwarding (upstream/stream_options.py): the usage event is ours to remove.
    strip_usage: bool = False
    # What was forwarded, for an estimate when the backend reports no usage.
    body: bytes = b""
    # The response's usage watcher: also the running count of a stream cut short.
    watch: UsageWatch | None = None
    # The streamed response once its head is sent, so a request cut short can still end it.
    stream: StreamResponse | None = None
    is_sse: bool = False
    # The metering spool's admission of this request (None without a spool).
    ticket: Ticket | None = None
    # The token limits' and budgets' reservation (limits/tokens.py), settled at the end.
    admission: Admission | None = None
    gate: TokenGate | None = None
    # The request body's model (metering/spend.py), for the usage record and spend counters.
    model: str | None = None


async def upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: the forward path's connection pools and the cold paths' client session."""
    config = app[CONFIG]
    pools = UpstreamPools(
        max_per_backend=config.upstream.max_connections_per_backend,
        connect_timeout=config.upstream.connect_timeout_seconds,
        read_timeout=config.upstream.read_timeout_seconds,
    )
    connector = aiohttp.TCPConnector(
        limit=0,  # the per-backend limit below is the real bound
        limit_per_host=_COLD_PATH_PER_BACKEND,
        keepalive_timeout=60.0,
        ttl_dns_cache=10,
    )
    session = aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        # Pass the client's headers through as sent; do not invent Accept/User-Agent/etc.
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        trust_env=False,
        read_bufsize=2**16,
    )
    app[UPSTREAM_SESSION] = session
    app[UPSTREAM_POOLS] = pools
    yield
    await pools.close()
    await session.close()


class ForwardedRequest(ClientRequest, Protocol):
    """What the forwarded headers are built from (the lean Request, or aiohttp's)."""

    @property
    def scheme(self) -> str: ...


def forward_pairs(
    request: ForwardedRequest, request_id: str, strip_credentials: bool,
    trusted: tuple[IPNetwork, ...] = (),
) -> list[tuple[str, str]]:
    """The headers sent upstream: client headers minus hop-by-hop ones, plus X-Forwarded-*
    (the client's own are kept only when its peer is in `trusted`)."""
    src = request.headers
    believed = peer_trusted(request.remote, trusted)
    extra_hop: set[str] = set()
    connection = src.get("Connection")
    if connection:
        extra_hop = {token.strip().lower() for token in connection.split(",")}
    out: list[tuple[str, str]] = []
    for key, value in src.items():
        lower = key.lower()
        if lower in _HOP_BY_HOP or lower in extra_hop:
            continue
        if strip_credentials and lower in _CREDENTIALS:
            continue  # the proxy's own credentials are not the backend's business
        if lower in _REPLACED or (not believed and lower in _PROXY_INFO):
            continue
        out.append((key, value))
    out.extend(_proxy_headers(request, request_id, believed))
    return out


def _proxy_headers(request: ForwardedRequest, request_id: str,
                   believed: bool) -> list[tuple[str, str]]:
    src = request.headers
    peer = request.remote or ""
    prior = src.get("X-Forwarded-For") if believed else None
    proto = src.get("X-Forwarded-Proto") if believed else None
    return [("X-Forwarded-For", f"{prior}, {peer}" if prior else peer),
            ("X-Forwarded-Proto", proto or request.scheme),
            ("X-Request-ID", request_id)]


def forward_head(request: Request, request_id: str, strip_credentials: bool,
                 trusted: tuple[IPNetwork, ...] = ()) -> bytes:
    """`forward_pairs` as the encoded header lines, built from the bytes the client sent
    (names are ASCII tokens, llhttp checked; values pass through byte for byte)."""
    believed = peer_trusted(request.remote, trusted)
    skip = _SKIP_RAW_SETS[believed, strip_credentials]
    connection = request.headers.get("Connection")
    if connection:
        skip = skip | {token.strip().lower().encode("utf-8", "surrogateescape")
                       for token in connection.split(",")}
    lines = [b"%b: %b\r\n" % pair for pair in request.raw_headers
             if pair[0].lower() not in skip]
    src = request.headers
    peer = request.remote or ""
    prior = src.get("X-Forwarded-For") if believed else None
    proto = src.get("X-Forwarded-Proto") if believed else None
    # The same three headers as _proxy_headers, in one string.
    ours = (f"X-Forwarded-For: {prior + ', ' + peer if prior else peer}\r\n"
            f"X-Forwarded-Proto: {proto or request.scheme}\r\n"
            f"X-Request-ID: {request_id}\r\n")
    lines.append(ours.encode("utf-8", "surrogateescape"))
    return b"".join(lines)


def forward_headers(
    request: ForwardedRequest, request_id: str, strip_credentials: bool,
    trusted: tuple[IPNetwork, ...] = (),
) -> CIMultiDict[str]:
    """`forward_pairs` as a multidict, for the aiohttp client on the cold paths."""
    return CIMultiDict(forward_pairs(request, request_id, strip_credentials, trusted))


def trusted_networks(config: ProxyConfig) -> tuple[IPNetwork, ...]:
    """rate_limits.trusted_proxies, parsed (cached per list)."""
    cidrs = config.rate_limits.trusted_proxies
    return parse_networks(tuple(cidrs)) if cidrs else ()


def request_bytes(method: str, target: str, host: str, header_lines: bytes,
                  body: bytes) -> bytes:
    """The whole request as one buffer (`header_lines` from forward_head): one write to the
    backend."""
    # The target was decoded as utf-8 with surrogateescape (http/protocol.py): same bytes back.
    start = f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n".encode("utf-8",
                                                                       "surrogateescape")
    length = (b"Content-Length: %d\r\n" % len(body)
              if body or method in _BODY_METHODS else b"")
    return b"".join((start, header_lines, length, b"\r\n", body))


def _response_headers(
    upstream: Iterable[tuple[str, str]], request_id: str, extra: Mapping[str, str] | None
) -> list[tuple[str, str]]:
    """The backend's headers minus hop-by-hop ones (upstream/pool.py already dropped those
    its Connection header names); ours (request id, rate limits) replace any of that name."""
    skip = _RESPONSE_SKIP_OURS
    if extra:
        names = tuple(extra)
        skip = _SKIP_FOR_EXTRA.get(names) or _skip_for(names)
    out = [(key, value) for key, value in upstream if key.lower() not in skip]
    out.append(("X-Request-ID", request_id))
    if extra:
        out.extend(extra.items())
    return out


def _skip_for(names: tuple[str, ...]) -> frozenset[str]:
    skip = _RESPONSE_SKIP_OURS | {name.lower() for name in names}
    if len(_SKIP_FOR_EXTRA) < 64:  # bounded: our header names come from a handful of sets
        _SKIP_FOR_EXTRA[names] = skip
    return skip


async def forward(
    request: Request,
    runtime: Runtime,
    pools: UpstreamPools,
    body: bytes,
    request_id: str,
    outcome: Outcome,
    extra_headers: Mapping[str, str] | None = None,
    strip_credentials: bool = True,
    meter_usage: bool = True,
    retries: Retrying | None = None,
    avoid: frozenset[str] = frozenset(),
) -> Answer:
    """Send the request to a backend chosen by the pool and relay the answer; with `retries`
    a refusal (connect failure, 429/503) is retried on other backends within the budget.
    `avoid` names backends to pass over while others are available (saturated ones)."""
    app = request.app
    metrics = app[METRICS]
    config = runtime.config
    if pools.generation != runtime.generation:
        upstream = config.upstream
        pools.configure(max_per_backend=upstream.max_connections_per_backend,
                        connect_timeout=upstream.connect_timeout_seconds,
                        read_timeout=upstream.read_timeout_seconds)
        pools.generation = runtime.generation
    pool = runtime.pool
    # Model, prefix and session hints, read only when a strategy in use needs them.
    hints = pool.hints_for(request.headers, body) if pool.needs_hints else None
    # --- retry hook (routing/retry.py): the first pick honors Retry-After penalties ---------
    now = time.monotonic()
    penalized = retries.penalties.active(now) if retries is not None else frozenset()
    if avoid:
        penalized = penalized | avoid
    if retries is not None:
        retries.budget.request(now)
    backend = pick(pool, (), penalized, hints) if penalized else pool.choose(hints=hints)
    if backend is None:
        outcome.status = 503
        # A health check can bring one back within its interval: that is when to retry.
        retry = {"Retry-After": str(max(1, math.ceil(config.health_check.interval_seconds)))}
        return json_error(503, "no_backend_available",
                          "no healthy backend is available; retry later", request_id,
                          {**(extra_headers or {}), **retry})
    headers = forward_head(request, request_id, strip_credentials, trusted_networks(config))
    method = request.method
    path_qs = request.target
    tried: tuple[BackendState, ...] = ()
    while True:
        outcome.backend = backend.name
        started = time.monotonic()
        payload = request_bytes(method, backend.path_prefix + path_qs, backend.host_header,
                                headers, body)
        try:
            conn, head = await pools.exchange(
                pools.pool(backend.host, backend.port, backend.use_ssl), payload,
                method == "HEAD",
            )
        except UpstreamConnectError as exc:
            # Nothing reached the backend: safe to try another one.
            timed_out = isinstance(exc, UpstreamConnectTimeout)
            _fail(backend, metrics, exc.reason, runtime)
            tried += (backend,)
            if config.upstream.retry_on_connect_failure:
                other = _next_attempt(pool, retries, tried, penalized, metrics, "connect", hints)
                if other is not None:
                    log.warning("connect to backend failed, retrying on another",
                                extra={"request_id": request_id, "backend": backend.name,
                                       "retry_backend": other.name, "error": str(exc)})
                    backend = other
                    continue
            if timed_out:
                outcome.status = 504
                return json_error(504, "upstream_timeout",
                                  f"connecting to backend {backend.name!r} timed out",
                                  request_id, extra_headers)
            outcome.status = 502
            return json_error(502, "upstream_unavailable",
                              f"could not connect to backend {backend.name!r}", request_id,
                              extra_headers)
        except UpstreamReadTimeout:
            _fail(backend, metrics, UpstreamReadTimeout.reason, runtime)
            outcome.status = 504
            return json_error(504, "upstream_timeout",
                              f"backend {backend.name!r} did not answer within "
                              f"{config.upstream.read_timeout_seconds:g}s", request_id,
                              extra_headers)
        except UpstreamError as exc:
            _fail(backend, metrics, exc.reason, runtime)
            log.warning("upstream request failed",
                        extra={"request_id": request_id, "backend": backend.name,
                               "error": repr(exc)})
            outcome.status = 502
            return json_error(502, "upstream_error",
                              f"backend {backend.name!r} failed: {type(exc).__name__}",
                              request_id, extra_headers)
        except BaseException:
            backend.abandon()  # cancelled (client hung up) or a bug: keep the counts right
            raise
        if retries is None or head.status not in retries.statuses:
            break
        # --- retry hook: the backend refused (429/503); nothing went to the client yet ------
        tried += (backend,)
        other = _next_attempt(pool, retries, tried, penalized, metrics, str(head.status),
                              hints)
        if other is None:
            break  # no attempt left: the client gets the refusal as the backend sent it
        try:
            await _discard(conn, head)
        except BaseException:
            other.abandon()
            backend.abandon()
            raise
        retries.penalties.add(backend.name, _header(head, "retry-after"),
                              retries.config.max_penalty_seconds, time.monotonic())
        log.info("backend refused, retrying on another",
                 extra={"request_id": request_id, "backend": backend.name,
                        "retry_backend": other.name, "status": head.status})
        backend.abandon()  # an answer that says nothing about the backend's speed or health
        backend = other
    try:
        return await _relay(request, conn, head, backend, runtime, started, request_id, outcome,
                            extra_headers, meter_usage)
    except asyncio.CancelledError:
        outcome.status = 499  # the client hung up (or the drain deadline passed)
        conn.abort()  # never hand a half-read connection back; the backend stops generating
        raise
    finally:
        backend.release()
        conn.release()  # back to the pool only when the response was read whole


def _next_attempt(pool: BackendPool, retries: Retrying | None, tried: tuple[BackendState, ...],
                  penalized: frozenset[str], metrics: ProxyMetrics, reason: str,
                  hints: RequestHints | None = None) -> BackendState | None:
    """The backend for one more attempt (acquired), or None: attempts or budget spent, or no
    backend left that was not tried. Without `retries`: one retry after a connect failure."""
    if retries is None:
        return pool.choose(exclude=tried[0], hints=hints) if len(tried) == 1 else None
    if len(tried) > retries.config.max_attempts:
        return None
    if not any(b not in tried for b in pool.backends):
        return None
    if not retries.budget.try_spend():
        metrics.upstream_retry_budget_exhausted.inc()
        return None
    other = pick(pool, tried, penalized, hints)
    if other is not None:
        metrics.upstream_retries.labels(reason).inc()
    return other


async def _discard(conn: UpstreamConnection, head: ResponseHead) -> None:
    """Drop a refused answer: a small body is read so the connection is pooled again."""
    length = head.content_length
    if length is None or length > _BUFFER_LIMIT:
        conn.abort()
        return
    try:
        await conn.read_all()
    except UpstreamError:
        conn.abort()
        return
    except BaseException:
        conn.abort()
        raise
    conn.release()


def _header(head: ResponseHead, name: str) -> str | None:
    for key, value in head.headers:
        if key.lower() == name:
            return value
    return None


def _fail(backend: BackendState, metrics: ProxyMetrics, reason: str, runtime: Runtime) -> None:
    backend.release()
    backend.record_failure(time.monotonic(), runtime.config.health_check)
    metrics.backend_failures.labels(backend.name, reason).inc()


async def _relay(
    request: Request, conn: UpstreamConnection, head: ResponseHead, backend: BackendState,
    runtime: Runtime, started: float, request_id: str, outcome: Outcome,
    extra: Mapping[str, str] | None, meter_usage: bool,
) -> Answer:
    status = head.status
    outcome.status = status
    now = time.monotonic()
    latency_ms = (now - started) * 1000.0
    # Any answer proves the transport works; a 5xx a client can provoke must not eject.
    backend.record_answer(status, latency_ms, runtime.config.load_balancing.ewma_alpha, now)
    headers = _response_headers(head.headers, request_id, extra)
    length = head.content_length
    content_type = head.content_type
    is_sse = content_type.startswith("text/event-stream")
    reason = head.reason or None
    if length is not None and length <= _BUFFER_LIMIT and not is_sse:
        try:
            payload = await conn.read_all()
        except UpstreamError as exc:
            return _late_failure(backend, runtime, request.app[METRICS], request_id, outcome,
                                 exc, extra)
        outcome.bytes_out = len(payload)
        if meter_usage and (watch := usage_watch(head, False)) is not None:
            watch.feed(payload)
            outcome.watch, outcome.usage = watch, watch.result()
        return Response(status, payload, headers=headers, reason=reason)

    out = StreamResponse(status, reason, headers=headers)
    if length is not None:
        out.content_length = length
    if runtime.draining:
        out.force_close()  # the client should reconnect elsewhere after this stream
    await out.prepare(request)
    outcome.stream, outcome.is_sse = out, is_sse
    # Usage is looked for only when it is recorded; otherwise chunks pass untouched. A body of
    # declared length is never shortened.
    watch = outcome.watch = usage_watch(
        head, outcome.strip_usage and length is None) if meter_usage else None
    sent = 0
    ticket = outcome.ticket
    admission, gate = outcome.admission, outcome.gate
    # Only an SSE stream checked against budgets pays for the check (one comparison a chunk).
    if not (is_sse and watch is not None and admission is not None and admission.budgets):
        gate = None
    try:
        while chunk := await conn.read():
            if watch is not None and not (chunk := watch.feed(chunk)):
                continue  # all of it held back or removed (the usage event)
            if gate is not None and admission is not None and watch is not None and \
                    await _over_budget(watch, admission, gate):
                # The chunk that crossed is not sent: what the client got stays reserved.
                sent += await _cut_at_budget(out, conn, admission, request_id)
                outcome.status = status
                return out
            sent += len(chunk)
            if ticket is not None and time.monotonic() >= ticket.due:
                # How far a stream got, should the process die before it ends.
                ticket.progress(status, backend.name, sent, None if watch is None else
                                completion_tokens_for(watch.completion_chunks,
                                                      watch.completion_chars))
            # Waits while the client's write buffer is high; meanwhile the connection pauses
            # reading from the backend once its own buffer is full.
            await out.write(chunk)
        if watch is not None and (chunk := watch.finish()):
            sent += len(chunk)
            await out.write(chunk)
        await out.write_eof()
    except ConnectionResetError:
        # The client went away: drop the upstream connection so the backend stops generating.
        outcome.status = 499
        conn.abort()
    except UpstreamError as exc:
        # Headers are gone already; cut the client connection so it sees an incomplete body.
        timed_out = isinstance(exc, TimeoutError)
        reason_label = "stream_timeout" if timed_out else f"stream_{exc.reason}"
        backend.record_failure(time.monotonic(), runtime.config.health_check)
        request.app[METRICS].backend_failures.labels(backend.name, reason_label).inc()
        log.warning("upstream stream interrupted",
                    extra={"request_id": request_id, "backend": backend.name,
                           "error": repr(exc)})
        outcome.status = 504 if timed_out else 502
        conn.abort()
        if request.transport is not None:
            request.transport.abort()
    finally:  # also when cancelled (client gone, upstream.max_request_seconds)
        outcome.bytes_out = sent
        if watch is not None:
            outcome.usage = watch.result()
    return out


async def _over_budget(watch: UsageWatch, admission: Admission, gate: TokenGate) -> bool:
    """Whether the stream just passed what its budgets allow (a Redis call only once it has
    used up its reservation, then once per budgets.stream_extend_tokens)."""
    so_far = completion_tokens_for(watch.completion_chunks, watch.completion_chars)
    if not gate.stream_check_due(admission, so_far):
        return False
    return not await gate.extend(admission, so_far)


async def _cut_at_budget(out: StreamResponse, conn: UpstreamConnection, admission: Admission,
                         request_id: str) -> int:
    """End a stream at its budget: a final SSE error event and [DONE]; the upstream connection
    is dropped (never pooled), so the backend stops generating."""
    conn.abort()
    out.force_close()
    event = b"data: " + json.dumps({"error": {
        "type": "budget_exceeded", "message": admission.cut_message,
        "request_id": request_id}}).encode() + b"\n\ndata: [DONE]\n\n"
    with contextlib.suppress(ConnectionError, RuntimeError, TimeoutError):
        async with asyncio.timeout(_END_WRITE_SECONDS):
            await out.write(event)
            await out.write_eof()
    return len(event)


async def end_overlong(request: Request, outcome: Outcome, request_id: str,
                       limit: float) -> Answer:
    """The request ran past upstream.max_request_seconds (its upstream side is closed): a 504,
    or for a stream already under way a final SSE error event, then the connection closes."""
    outcome.status = 504
    message = (f"the request ran longer than upstream.max_request_seconds ({limit:g}s) "
               "and was ended")
    out = outcome.stream
    if out is None:
        resp = json_error(504, "request_timeout", message, request_id)
        resp.force_close()
        return resp
    out.force_close()
    if outcome.is_sse:
        event = b"event: error\ndata: " + error_body("request_timeout", message,
                                                     request_id) + b"\n\n"
        # Bounded: a client that does not read is not waited for.
        with contextlib.suppress(ConnectionError, RuntimeError, TimeoutError):
            async with asyncio.timeout(_END_WRITE_SECONDS):
                await out.write(event)
                await out.write_eof()
            return out
    if request.transport is not None:
        request.transport.abort()  # not SSE: an incomplete body is the only honest signal
    return out


def _late_failure(
    backend: BackendState, runtime: Runtime, metrics: ProxyMetrics, request_id: str,
    outcome: Outcome, exc: UpstreamError, extra: Mapping[str, str] | None,
) -> Answer:
    # Counted and logged like a stream that breaks off: the head came, the body did not.
    backend.record_failure(time.monotonic(), runtime.config.health_check)
    metrics.backend_failures.labels(backend.name, exc.reason).inc()
    log.warning("upstream response broken off",
                extra={"request_id": request_id, "backend": backend.name, "error": repr(exc)})
    if isinstance(exc, TimeoutError):
        outcome.status = 504
        return json_error(504, "upstream_timeout",
                          f"backend {backend.name!r} stopped sending its response", request_id,
                          extra)
    outcome.status = 502
    return json_error(502, "upstream_error",
                      f"backend {backend.name!r} broke off its response", request_id, extra)
