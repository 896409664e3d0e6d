"""Forwarding to a backend: one pooled client session, header hygiene, streaming, retries.

Responses are written chunk by chunk as they arrive; only small JSON bodies with a known length
are read whole (one write, and their `usage` can be parsed). A connection failure before any
byte was sent is retried once on another backend.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from gpuproxy_proxy.appkeys import CONFIG, METRICS
from gpuproxy_proxy.backends import BackendState
from gpuproxy_proxy.errors import json_error
from gpuproxy_proxy.metrics import ProxyMetrics
from gpuproxy_proxy.runtime import Runtime
from gpuproxy_proxy.tokens import SseUsageScanner, Usage, usage_from_json

log = logging.getLogger("gpuproxy.upstream")

UPSTREAM_SESSION = web.AppKey("upstream_session", aiohttp.ClientSession)

# RFC 9110 7.6.1 hop-by-hop headers, plus ones the client library recomputes itself.
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "host", "content-length", "expect",
})
_CREDENTIALS = frozenset({"authorization", "x-api-key"})
_RESPONSE_SKIP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "content-length",
})
# Small bodies of known length are read whole: one write downstream and cheap usage parsing.
_BUFFER_LIMIT = 64 * 1024


@dataclass(slots=True)
class Outcome:
    """What the metering record and the metrics need to know about one forwarded request."""

    status: int = 0
    backend: str | None = None
    bytes_out: int = 0
    usage: Usage | None = None


async def upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: the one pooled client session of this process."""
    config = app[CONFIG]
    connector = aiohttp.TCPConnector(
        limit=0,  # the per-backend limit below is the real bound
        limit_per_host=config.upstream.max_connections_per_backend,
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
    yield
    await session.close()


def forward_headers(
    request: web.Request, request_id: str, strip_credentials: bool
) -> CIMultiDict[str]:
    """The headers sent upstream: client headers minus hop-by-hop ones, plus X-Forwarded-*."""
    src = request.headers
    extra_hop: set[str] = set()
    connection = src.get("Connection")
    if connection:
        extra_hop = {token.strip().lower() for token in connection.split(",")}
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in src.items():
        lower = key.lower()
        if lower in _HOP_BY_HOP or lower in extra_hop:
            continue
        if strip_credentials and lower in _CREDENTIALS:
            continue  # the proxy's own credentials are not the backend's business
        if lower in ("x-forwarded-for", "x-request-id", "x-forwarded-proto"):
            continue
        out.add(key, value)
    peer = request.remote or ""
    prior = src.get("X-Forwarded-For")
    out["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    out["X-Forwarded-Proto"] = src.get("X-Forwarded-Proto") or request.scheme
    out["X-Request-ID"] = request_id
    return out


def _response_headers(
    upstream: Mapping[str, str], request_id: str, extra: Mapping[str, str] | None
) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in upstream.items():
        if key.lower() not in _RESPONSE_SKIP:
            out.add(key, value)
    out["X-Request-ID"] = request_id
    if extra:
        out.update(extra)
    return out


async def forward(
    request: web.Request,
    runtime: Runtime,
    session: aiohttp.ClientSession,
    body: bytes,
    request_id: str,
    outcome: Outcome,
    extra_headers: Mapping[str, str] | None = None,
) -> web.StreamResponse:
    """Send the request to a backend chosen by the pool and relay the answer."""
    app = request.app
    metrics = app[METRICS]
    config = runtime.config
    pool = runtime.pool
    backend = pool.choose()
    if backend is None:
        outcome.status = 503
        return json_error(503, "no_backend_available",
                          "no healthy backend is available; retry later", request_id,
                          extra_headers)
    headers = forward_headers(request, request_id, app[CONFIG].auth.enabled)
    path_qs = request.rel_url.raw_path_qs
    data = body or None
    retried = False
    while True:
        outcome.backend = backend.name
        started = time.monotonic()
        try:
            resp = await session.request(
                request.method, backend.upstream_url(path_qs), headers=headers, data=data,
                timeout=runtime.timeout, allow_redirects=False,
            )
            break
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            # Nothing reached the backend: safe to try another one, once.
            reason = "connect_timeout" if isinstance(exc, TimeoutError) else "connect"
            _fail(backend, metrics, reason, runtime)
            if not retried and config.upstream.retry_on_connect_failure:
                other = pool.choose(exclude=backend)
                if other is not None:
                    log.warning("connect to backend failed, retrying on another",
                                extra={"request_id": request_id, "backend": backend.name,
                                       "retry_backend": other.name, "error": str(exc)})
                    backend, retried = other, True
                    continue
            if isinstance(exc, TimeoutError):
                outcome.status = 504
                return json_error(504, "upstream_timeout",
                                  f"connecting to backend {backend.name!r} timed out",
                                  request_id, extra_headers)
            outcome.status = 502
            return json_error(502, "upstream_unavailable",
                              f"could not connect to backend {backend.name!r}", request_id,
                              extra_headers)
        except TimeoutError:
            _fail(backend, metrics, "read_timeout", runtime)
            outcome.status = 504
            return json_error(504, "upstream_timeout",
                              f"backend {backend.name!r} did not answer within "
                              f"{config.upstream.read_timeout_seconds:g}s", request_id,
                              extra_headers)
        except aiohttp.ClientError as exc:
            _fail(backend, metrics, "error", runtime)
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
    try:
        return await _relay(request, resp, backend, runtime, started, request_id, outcome,
                            extra_headers)
    except asyncio.CancelledError:
        outcome.status = 499  # the client hung up (or the drain deadline passed)
        resp.close()  # never hand a half-read connection back to the pool
        raise
    finally:
        backend.release()
        resp.release()


def _fail(backend: BackendState, metrics: ProxyMetrics, reason: str, runtime: Runtime) -> None:
    backend.release()
    backend.record_failure(time.monotonic(), runtime.config.health_check)
    metrics.backend_failures.labels(backend.name, reason).inc()


async def _relay(
    request: web.Request, resp: aiohttp.ClientResponse, backend: BackendState, runtime: Runtime,
    started: float, request_id: str, outcome: Outcome, extra: Mapping[str, str] | None,
) -> web.StreamResponse:
    status = resp.status
    outcome.status = status
    now = time.monotonic()
    latency_ms = (now - started) * 1000.0
    if status >= 500:
        backend.record_failure(now, runtime.config.health_check)
    else:
        backend.record_success(latency_ms, runtime.config.load_balancing.ewma_alpha, now)
    headers = _response_headers(resp.headers, request_id, extra)
    length = resp.content_length
    content_type = resp.headers.get("Content-Type", "")
    is_sse = content_type.startswith("text/event-stream")
    if length is not None and length <= _BUFFER_LIMIT and not is_sse:
        try:
            payload = await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            return _late_failure(backend, runtime, request_id, outcome, exc, extra)
        outcome.bytes_out = len(payload)
        if "json" in content_type:
            outcome.usage = usage_from_json(payload)
        return web.Response(status=status, reason=resp.reason, body=payload, headers=headers)

    out = web.StreamResponse(status=status, reason=resp.reason, headers=headers)
    if length is not None:
        out.content_length = length
    await out.prepare(request)
    scanner = SseUsageScanner() if is_sse else None
    sent = 0
    try:
        async for chunk in resp.content.iter_any():
            if scanner is not None:
                scanner.feed(chunk)
            sent += len(chunk)
            await out.write(chunk)
        await out.write_eof()
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        # The client went away: drop the upstream connection so the backend stops generating.
        outcome.status = 499
        resp.close()
    except (aiohttp.ClientError, TimeoutError) as exc:
        # Headers are gone already; cut the client connection so it sees an incomplete body.
        reason = "stream_timeout" if isinstance(exc, TimeoutError) else "stream_error"
        backend.record_failure(time.monotonic(), runtime.config.health_check)
        request.app[METRICS].backend_failures.labels(backend.name, reason).inc()
        log.warning("upstream stream interrupted",
                    extra={"request_id": request_id, "backend": backend.name,
                           "error": repr(exc)})
        outcome.status = 504 if isinstance(exc, TimeoutError) else 502
        resp.close()
        if request.transport is not None:
            request.transport.abort()
    outcome.bytes_out = sent
    if scanner is not None:
        outcome.usage = scanner.result()
    return out


def _late_failure(
    backend: BackendState, runtime: Runtime, request_id: str, outcome: Outcome,
    exc: BaseException, extra: Mapping[str, str] | None,
) -> web.Response:
    backend.record_failure(time.monotonic(), runtime.config.health_check)
    if isinstance(exc, TimeoutError):
        outcome.status = 504
        return json_error(504, "upstream_timeout",
                          f"backend {backend.name!r} stopped sending its response", request_id,
                          extra)
    outcome.status = 502
    return json_error(502, "upstream_error",
                      f"backend {backend.name!r} broke off its response", request_id, extra)
