"""The client port's connections under aiohttp: a per-worker cap (idle keep-alive connections
evicted first, then a fast 503), JSON errors for what aiohttp answers itself, `Connection: close`
while draining, live limits, and the drain's view of the connections (lifecycle.ConnectionSet).
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from aiohttp import web, web_protocol, web_server
from aiohttp.web_request import BaseRequest

from gpuproxy_proxy.appkeys import METRICS
from gpuproxy_proxy.config import LimitsConfig
from gpuproxy_proxy.http.errors import error_body, json_error, kind_for_status
from gpuproxy_proxy.http.lean_handler import LeanRequestHandler
from gpuproxy_proxy.http.requestid import new_request_id, request_id_for
from gpuproxy_proxy.observability.metrics import ProxyMetrics
from gpuproxy_proxy.runtime import RUNTIME, Runtime

_REJECT_MESSAGE = "the proxy is at its connection limit; retry shortly"
_REJECT_HEAD = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                b"Retry-After: 1\r\nConnection: close\r\n")
# Eviction looks at the oldest connections only, so a burst over the cap costs O(1) each.
_EVICT_SCAN = 256
_EVICT_BATCH = 4
_LINGER_SECONDS = 2.0


def _reject_response() -> bytes:
    # No request has been read yet, so the id is a new one.
    request_id = new_request_id()
    body = error_body("overloaded", _REJECT_MESSAGE, request_id)
    return (_REJECT_HEAD + b"X-Request-ID: " + request_id.encode() + b"\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


class _Rejected(asyncio.Protocol):
    """Answers 503 at once, then a lingering close: what the client already sent is read and
    dropped (closing with unread data would send a RST that can destroy the 503 in flight)."""

    def __init__(self, handler: web_protocol.RequestHandler, transport: asyncio.Transport) -> None:
        self._handler = handler
        self._transport = transport
        transport.set_protocol(self)
        transport.write(_reject_response())
        transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(_LINGER_SECONDS, transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the client is done too: close now

    def connection_lost(self, exc: Exception | None) -> None:
        self._timer.cancel()
        self._handler.connection_lost(exc)  # aiohttp's bookkeeping and our counters


class ClientRequestHandler(LeanRequestHandler):
    """The client port's connection handler: what aiohttp answers by itself (a malformed
    request, an unhandled exception) gets the JSON error shape and a request id too."""

    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        # aiohttp's own: logs, and raises if a response has already begun.
        super().handle_error(request, status, exc, message)
        if status == 500 or not message:
            message = "the proxy failed to handle this request (logged)"
        # The parser's messages span lines (the bad bytes with a caret under them).
        resp = json_error(status, kind_for_status(status), " ".join(message.split()),
                          request_id_for(request))
        resp.force_close()
        return resp

    async def finish_response(self, request: BaseRequest, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        manager = self._manager
        if isinstance(manager, CappedServer) and manager.draining:
            # Draining: `Connection: close`, so the client reconnects to another pod; and a
            # response that began before SIGTERM (keep-alive in its head) closes right after
            # its last byte, instead of idling where the client could send the next request
            # just as the drain closes it.
            if not resp.prepared:
                resp.force_close()
            self.close()
        return await super().finish_response(request, resp, start_time)


def _is_idle(handler: web_protocol.RequestHandler) -> bool:
    """Waiting for the next request on a keep-alive connection: closing it loses nothing."""
    waiter = handler._waiter
    return not handler._request_in_progress and waiter is not None and not waiter.done()


class CappedServer(web_server.Server):
    """aiohttp's connection manager plus a per-process connection cap.

    Over the cap, the oldest idle keep-alive connections are closed to make room; when none is
    idle, the new connection gets an immediate 503 and is closed.
    """

    def __init__(self, *args: Any, runtime: Runtime, metrics: ProxyMetrics, cap: int,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._runtime = runtime
        self._cap = cap
        self._gauge = metrics.connections_active
        self._rejected = metrics.connections_rejected.labels("connections")
        self._evicted = metrics.connections_rejected.labels("idle_evicted")

    def __call__(self) -> web_protocol.RequestHandler:
        return ClientRequestHandler(self, loop=self._loop, **self._kwargs)

    def connection_made(self, handler: web_protocol.RequestHandler,
                        transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        runtime = self._runtime
        runtime.connections_active += 1
        self._gauge.inc()
        if runtime.connections_active > self._cap and not self._evict_idle(handler):
            runtime.connections_rejected += 1
            self._rejected.inc()
            _Rejected(handler, transport)
            # No connection of this server any more: while it lingers it must not look idle,
            # or evicting it would let the next connection past the cap.
            del self._connections[handler]

    def connection_lost(self, handler: web_protocol.RequestHandler,
                        exc: BaseException | None = None) -> None:
        self._runtime.connections_active -= 1
        self._gauge.dec()
        super().connection_lost(handler, exc)

    @property
    def draining(self) -> bool:
        return self._runtime.draining

    def apply_limits(self, limits: LimitsConfig) -> None:
        """A config reload: the cap applies to the next connection (nothing open is closed
        for it), the keep-alive timeout to every connection, idle ones included."""
        self._cap = limits.max_connections_per_worker
        timeout = limits.keepalive_timeout_seconds
        old = float(self._kwargs.get("keepalive_timeout", timeout))
        self._kwargs["keepalive_timeout"] = timeout
        for handler in self._connections:
            handler._keepalive_timeout = timeout
            handle = handler._keepalive_handle
            if handle is None:
                continue
            # aiohttp's timer only ever fires late and re-arms itself for the recorded close
            # time: move that time, and re-arm the timer when it now comes earlier. (uvloop's
            # timer handles are no asyncio.TimerHandle, but have when() too.)
            close_at = handler._next_keepalive_close_time - old + timeout
            handler._next_keepalive_close_time = close_at
            if close_at < cast(asyncio.TimerHandle, handle).when():
                handle.cancel()
                handler._keepalive_handle = self._loop.call_at(
                    close_at, handler._process_keepalive)

    def _evict_idle(self, new: web_protocol.RequestHandler) -> bool:
        evicted = 0
        for scanned, handler in enumerate(self._connections):
            if scanned >= _EVICT_SCAN:
                break
            if handler is not new and _is_idle(handler):
                handler.force_close()  # idle: no request in progress, nothing is lost
                evicted += 1
                if evicted >= _EVICT_BATCH:
                    break
        if evicted:
            self._evicted.inc(evicted)
        return evicted > 0


class ProxyRunner(web.AppRunner):
    """AppRunner whose connection manager is a CappedServer."""

    def __init__(self, app: web.Application, *, cap: int, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._cap = cap

    async def _make_server(self) -> web_server.Server:
        base = await super()._make_server()
        return CappedServer(
            base.request_handler, request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation, loop=base._loop,
            runtime=self.app[RUNTIME], metrics=self.app[METRICS], cap=self._cap,
            **base._kwargs,
        )


class AiohttpConnections:
    """lifecycle.ConnectionSet over aiohttp's runner: what the drain does to connections."""

    def __init__(self, runner: web.AppRunner, runtime: Runtime) -> None:
        self._runner = runner
        self._runtime = runtime

    def _handlers(self) -> list[web_protocol.RequestHandler]:
        server = self._runner.server
        return [] if server is None else list(server._connections)

    async def stop_accepting(self) -> None:
        for site in list(self._runner.sites):
            await site.stop()  # closes the listening socket only

    def open_count(self) -> int:
        return self._runtime.connections_active

    def idle(self) -> list[web_protocol.RequestHandler]:
        return [h for h in self._handlers() if _is_idle(h)]

    def close_if_idle(self, conn: web_protocol.RequestHandler) -> bool:
        if not _is_idle(conn):
            return False
        conn.force_close()
        return True

    async def close_all(self) -> None:
        for handler in self._handlers():
            handler.force_close()  # the handler is cancelled, which closes its upstream side
