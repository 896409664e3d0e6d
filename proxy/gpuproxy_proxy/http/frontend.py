"""The client port's server: accepts on the worker's SO_REUSEPORT socket, holds the open
connections (cap with idle eviction, keep-alive sweep, the drain's ConnectionSet), and routes
each request to the Pipeline (the admin API has its own listener). aiohttp's web.Application
only carries the services' lifecycle (cleanup contexts run by an AppRunner that serves nothing)."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl

from aiohttp import web

from gpuproxy_proxy.appkeys import METRICS
from gpuproxy_proxy.config import LimitsConfig, ProxyConfig
from gpuproxy_proxy.http.deadlines import ClientDeadlines
from gpuproxy_proxy.http.errors import error_body
from gpuproxy_proxy.http.exceptions import with_request_id
from gpuproxy_proxy.http.protocol import HttpConnection, error_response, unhandled
from gpuproxy_proxy.http.request import BadBody, Request
from gpuproxy_proxy.http.requestid import new_request_id
from gpuproxy_proxy.http.response import Answer, Response, StreamResponse, from_aiohttp
from gpuproxy_proxy.http.router import route_for
from gpuproxy_proxy.http.timers import KeepAliveSweep
from gpuproxy_proxy.http.tls import TlsTerminator
from gpuproxy_proxy.routes import PIPELINE
from gpuproxy_proxy.runtime import RUNTIME

_REJECT_MESSAGE = "the proxy is at its connection limit; retry shortly"
_REJECT_HEAD = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                b"Retry-After: 1\r\nConnection: close\r\n")
# Eviction looks at the oldest connections only, so a burst over the cap costs O(1) each.
_EVICT_SCAN = 256
_EVICT_BATCH = 4
# After the drain's cut, how long the cancelled handlers get to finish (metering records).
_CUT_WAIT_SECONDS = 5.0


def _reject_response() -> bytes:
    request_id = new_request_id()  # no request has been read
    body = error_body("overloaded", _REJECT_MESSAGE, request_id)
    return (_REJECT_HEAD + b"X-Request-ID: " + request_id.encode() + b"\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


class Frontend:
    """One process's client-port server; also the drain's lifecycle.ConnectionSet."""

    def __init__(self, app: web.Application, access_log: logging.Logger | None = None) -> None:
        runtime = app[RUNTIME]
        metrics = app[METRICS]
        limits = runtime.config.limits
        self.app = app
        self._runtime = runtime
        self._pipeline = app[PIPELINE]  # the cleanup contexts have run
        self._loop = asyncio.get_running_loop()
        self._conns: dict[HttpConnection, None] = {}  # insertion order: oldest first
        self._server: asyncio.Server | None = None
        self._cap = limits.max_connections_per_worker
        self.max_body = limits.max_body_bytes
        self.sweep = KeepAliveSweep(limits.keepalive_timeout_seconds)
        self.deadlines = ClientDeadlines(limits, metrics)
        self._access = access_log
        self._gauge = metrics.connections_active
        self._rejected = metrics.connections_rejected.labels("connections")
        self._evicted = metrics.connections_rejected.labels("idle_evicted")
        runtime.listeners.append(self._on_reload)

    async def listen(self, sock: socket.socket, backlog: int = 2048,
                     tls: ssl.SSLContext | None = None, handshake_timeout: float = 10.0) -> None:
        """Serve `sock`; with `tls`, HTTPS only (a plain request fails its handshake). A
        connection counts (cap, sweep) once its handshake is done."""
        self._server = await self._loop.create_server(
            lambda: HttpConnection(self), sock=sock, backlog=backlog, ssl=tls,
            ssl_handshake_timeout=handshake_timeout if tls is not None else None)

    @property
    def draining(self) -> bool:
        return self._runtime.draining

    def _on_reload(self, old: ProxyConfig, new: ProxyConfig) -> None:
        if old.limits != new.limits:
            self.apply_limits(new.limits)

    def apply_limits(self, limits: LimitsConfig) -> None:
        """A reload: the cap applies to the next connection (none open is closed for it),
        the keep-alive timeout to every waiting connection, the body limit to new requests."""
        self._cap = limits.max_connections_per_worker
        self.max_body = limits.max_body_bytes
        self.sweep.set_timeout(limits.keepalive_timeout_seconds)
        self.deadlines.apply(limits)

    # --- connections ----------------------------------------------------------------------

    def connection_made(self, conn: HttpConnection) -> None:
        runtime = self._runtime
        runtime.connections_active += 1
        self._gauge.inc()
        if runtime.connections_active > self._cap and not self._evict_idle():
            runtime.connections_rejected += 1
            self._rejected.inc()
            conn.reject(_reject_response())  # not one of ours: never idle, never evicted
            return
        self._conns[conn] = None
        self.sweep.watch(conn)  # a new connection waits for its first request

    def connection_lost(self, conn: HttpConnection) -> None:
        self._runtime.connections_active -= 1
        self._gauge.dec()
        self._conns.pop(conn, None)
        self.sweep.unwatch(conn)

    def _evict_idle(self) -> bool:
        evicted = 0
        for scanned, conn in enumerate(self._conns):
            if scanned >= _EVICT_SCAN:
                break
            if conn.idle:
                conn.close()  # idle: no request in progress, nothing is lost
                evicted += 1
                if evicted >= _EVICT_BATCH:
                    break
        if evicted:
            self._evicted.inc(evicted)
        return evicted > 0

    # --- requests -------------------------------------------------------------------------

    async def _dispatch(self, request: Request) -> Answer:
        if request.path_error is not None:
            resp = error_response(400, "invalid_request_error", request.path_error,
                                  request.request_id)
            resp.close = False
            return resp
        kind, arg = route_for(request.method, request.path)
        if kind == "proxy":
            return await self._pipeline.handle(request, arg)
        # Nothing says where the admin API is: the client port is open to everyone.
        resp = error_response(404, "not_found", f"no route for {request.method} "
                              f"{request.path}; the proxy serves /v1/* (OpenAI-compatible)",
                              request.request_id)
        resp.close = False
        return resp

    async def respond(self, conn: HttpConnection, request: Request) -> bool:
        """Answer `request`; True when the connection closes after it."""
        started = self._loop.time()
        try:
            resp = await self._dispatch(request)
        except BadBody as exc:
            resp = exc.answer
        except web.HTTPException as exc:
            if "X-Request-ID" not in exc.headers:
                with_request_id(exc, request.request_id)
            resp = from_aiohttp(exc)
        except Exception:
            unhandled.exception("unhandled exception while answering a request",
                                extra={"request_id": request.request_id})
            resp = error_response(500, "internal_error", "the proxy failed to handle this "
                                  "request (logged)", request.request_id)
        if isinstance(resp, StreamResponse):
            # Written already; one that did not end cut the connection or must be cut now.
            close = resp.close or not resp.finished or conn.closing_after(request)
            status, sent = resp.status, resp.body_length
        else:
            if not isinstance(resp, Response):
                resp = from_aiohttp(resp)
            close = resp.close or conn.closing_after(request)
            conn.write_raw(resp.encode(close, request.method == "HEAD"))
            status, sent = resp.status, len(resp.body)
        if self._access is not None:
            self._access.info("request", extra={
                "request_id": request.request_id, "method": request.method,
                "path": request.path, "status": status,
                "duration_ms": round((self._loop.time() - started) * 1000.0, 3),
                "remote": request.remote, "bytes_out": sent,
            })
        return close

    # --- lifecycle.ConnectionSet ----------------------------------------------------------

    async def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()  # the listening socket only; connections stay

    def open_count(self) -> int:
        return self._runtime.connections_active

    def idle(self) -> list[HttpConnection]:
        return [c for c in self._conns if c.idle]

    def close_if_idle(self, conn: HttpConnection) -> bool:
        if not conn.idle:
            return False
        conn.close()
        return True

    async def close_all(self) -> None:
        """Cut every connection; their handlers are cancelled (upstream sides closed)."""
        tasks = [c._task for c in self._conns if c._task is not None]
        for conn in list(self._conns):
            conn.abort()
        self.sweep.close()
        self.deadlines.close()
        listeners = self._runtime.listeners
        if self._on_reload in listeners:
            listeners.remove(self._on_reload)
        if tasks:
            await asyncio.wait(tasks, timeout=_CUT_WAIT_SECONDS)


class ClientPort:
    """The app's services (AppRunner.setup runs the cleanup contexts) plus the Frontend."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.runner = web.AppRunner(app, handle_signals=False, access_log=None)
        self.frontend: Frontend | None = None
        self.tls: TlsTerminator | None = None

    async def start(self, sock: socket.socket, backlog: int = 2048,
                    access_log: logging.Logger | None = None) -> Frontend:
        runtime = self.app[RUNTIME]
        tls_config = runtime.config.listen.tls
        if tls_config is not None:
            # Before the services start: a pair that does not load stops the process here.
            metrics = self.app[METRICS]
            reloads = metrics.tls_certificate_reloads
            tls = self.tls = TlsTerminator(tls_config,
                                           lambda: runtime.config.reload.interval_seconds,
                                           lambda result: reloads.labels(result).inc())
            metrics.track_tls_expiry(lambda: tls.not_after)
        await self.runner.setup()
        self.frontend = Frontend(self.app, access_log)
        if self.tls is not None:
            assert tls_config is not None
            await self.frontend.listen(sock, backlog, self.tls.context,
                                       tls_config.handshake_timeout_seconds)
            self.tls.start()  # polled even with reload.enabled false, like the secret files
        else:
            await self.frontend.listen(sock, backlog)
        return self.frontend

    async def close(self) -> None:
        """Stop serving at once (tests, and after the drain), then the cleanup contexts."""
        if self.tls is not None:
            await self.tls.close()
        if self.frontend is not None:
            await self.frontend.stop_accepting()
            await self.frontend.close_all()
        await self.runner.cleanup()

