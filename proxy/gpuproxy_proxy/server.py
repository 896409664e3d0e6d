"""One worker process: the client port (SO_REUSEPORT, connection cap with idle eviction), its
status endpoints, GC control, and a graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from aiohttp import web, web_protocol, web_server
from aiohttp.web_request import BaseRequest

from gpuproxy_proxy.app import build_app
from gpuproxy_proxy.appkeys import METRICS
from gpuproxy_proxy.config import ProxyConfig, Secrets
from gpuproxy_proxy.errors import error_body, json_error, kind_for_status
from gpuproxy_proxy.gcwatch import (
    FullCollectionsOff,
    GcMonitor,
    freeze_after_warmup,
    freeze_periodically,
)
from gpuproxy_proxy.lean_handler import LeanRequestHandler
from gpuproxy_proxy.logging import JsonAccessLogger
from gpuproxy_proxy.metrics import ProxyMetrics
from gpuproxy_proxy.requestid import new_request_id, request_id_for
from gpuproxy_proxy.runtime import RUNTIME, Runtime
from gpuproxy_proxy.status import GC_MONITOR, LocalSource, build_status_app

log = logging.getLogger("gpuproxy.server")

_REJECT_MESSAGE = "the proxy is at its connection limit; retry shortly"
_REJECT_HEAD = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                b"Retry-After: 1\r\nConnection: close\r\n")
# Eviction looks at the oldest connections only, so a burst over the cap costs O(1) each.
_EVICT_SCAN = 256
_EVICT_BATCH = 4
_LINGER_SECONDS = 2.0


def raise_nofile_limit() -> int:
    """Raise the soft open-files limit to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


class ListenError(RuntimeError):
    """A port could not be bound; the message names the config field to change."""


def _bind(sock: socket.socket, host: str, port: int, field: str) -> None:
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ListenError(
            f"cannot listen on {host}:{port} ({exc.strerror}): change {field} in the config "
            "file or stop the process that uses the port"
        ) from exc


def reuseport_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A listening socket every worker binds on its own; the kernel spreads connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    # Accepted sockets inherit it on Linux: SSE chunks leave at once.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _bind(sock, host, port, "listen.port")
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


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

    def connection_lost(self, handler: web_protocol.RequestHandler,
                        exc: BaseException | None = None) -> None:
        self._runtime.connections_active -= 1
        self._gauge.dec()
        super().connection_lost(handler, exc)

    def _evict_idle(self, new: web_protocol.RequestHandler) -> bool:
        evicted = 0
        for scanned, handler in enumerate(self._connections):
            if scanned >= _EVICT_SCAN:
                break
            waiter = handler._waiter
            if (handler is not new and not handler._request_in_progress
                    and waiter is not None and not waiter.done()):
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


class Worker:
    """The client-port app of one process plus its status endpoints."""

    def __init__(self, config: ProxyConfig, secrets: Secrets, *, config_path: Path | None = None,
                 worker_index: int = 0) -> None:
        self.config = config
        self.app = build_app(config, secrets, config_path=config_path, worker_index=worker_index)
        kwargs: dict[str, Any] = {"access_log": None}
        if config.logging.access_log:
            kwargs = {"access_log_class": JsonAccessLogger,
                      "access_log": logging.getLogger("gpuproxy.access")}
        self.runner = ProxyRunner(
            self.app, cap=config.limits.max_connections_per_worker, handle_signals=False,
            shutdown_timeout=config.limits.shutdown_grace_seconds,
            keepalive_timeout=config.limits.keepalive_timeout_seconds,
            # A client that hangs up cancels its handler, which closes the upstream request:
            # the GPU stops generating for nobody.
            handler_cancellation=True, **kwargs,
        )
        self.status_runner: web.AppRunner | None = None
        self.gc_monitor = GcMonitor(self.app[METRICS])
        self._full_gc_off = FullCollectionsOff()
        self.app[GC_MONITOR] = self.gc_monitor
        self.stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def runtime(self) -> Runtime:
        return self.app[RUNTIME]

    async def start(self, sock: socket.socket, *, admin: socket.socket | None = None,
                    status_path: Path | None = None) -> None:
        """Serve clients on `sock`; status on an admin TCP socket or a worker status socket."""
        await self.runner.setup()
        await web.SockSite(self.runner, sock, backlog=self.config.listen.backlog).start()
        if admin is not None or status_path is not None:
            status_app = build_status_app([LocalSource(self.app)],
                                          lambda: self.runtime.draining,
                                          aggregate=admin is not None)
            self.status_runner = web.AppRunner(status_app, handle_signals=False, access_log=None)
            await self.status_runner.setup()
            if admin is not None:
                await web.SockSite(self.status_runner, admin).start()
            else:
                assert status_path is not None
                await web.UnixSite(self.status_runner, str(status_path)).start()
        # Warm-up is over: everything alive now lives as long as the process.
        freeze_after_warmup()
        self.gc_monitor.install()
        interval = self.config.limits.gc_freeze_interval_seconds
        if interval > 0:
            self._full_gc_off.disable()
            self._tasks.append(
                asyncio.create_task(freeze_periodically(interval), name="gc-freeze"))

    async def drain(self) -> None:
        """Report not ready, stop accepting, finish in-flight requests, then run cleanup."""
        runtime = self.runtime
        runtime.draining = True
        log.info("draining: %d connections, %d requests in flight",
                 runtime.connections_active, runtime.in_flight)
        for task in self._tasks:
            task.cancel()
        self.gc_monitor.uninstall()
        self._full_gc_off.restore()
        delay = self.config.limits.drain_delay_seconds
        if delay > 0:
            await asyncio.sleep(delay)
        # Stops the listener, closes idle keep-alive connections, waits for in-flight requests
        # up to shutdown_grace_seconds, then runs the cleanup contexts (metering flush).
        await self.runner.cleanup()
        if self.status_runner is not None:
            await self.status_runner.cleanup()
        log.info("drained")

    def install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)

    async def watch_parent(self, parent_pid: int) -> None:
        """A worker whose supervisor died drains itself instead of serving forever."""
        while True:
            await asyncio.sleep(1.0)
            if os.getppid() != parent_pid:
                self.stopping.set()
                return


def admin_socket(config: ProxyConfig) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in config.listen.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    _bind(sock, config.listen.host, config.listen.admin_port, "listen.admin_port")
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def serve_single(config: ProxyConfig, secrets: Secrets, config_path: Path | None,
                       on_ready: Callable[[Worker], Coroutine[Any, Any, None]] | None = None,
                       ) -> None:
    """workers == 1: one process serves the client port and the admin port."""
    worker = Worker(config, secrets, config_path=config_path)
    sock = reuseport_socket(config.listen.host, config.listen.port, config.listen.backlog)
    await worker.start(sock, admin=admin_socket(config))
    worker.install_signals()
    log.info("serving on %s:%d (admin %d), %d backends, strategy %s",
             config.listen.host, config.listen.port, config.listen.admin_port,
             len(config.backends), config.load_balancing.strategy)
    task = None
    if on_ready is not None:
        task = asyncio.create_task(on_ready(worker))
        task.add_done_callback(lambda _: worker.stopping.set())
    await worker.stopping.wait()
    if task is not None and not task.done():
        task.cancel()  # SIGTERM before the on_ready job finished
    await worker.drain()
    if task is not None:
        with contextlib.suppress(asyncio.CancelledError):
            await task  # re-raises the job's failure, if any


async def serve_worker(config: ProxyConfig, secrets: Secrets, config_path: Path,
                       index: int, status_path: Path, parent_pid: int) -> None:
    """One of N workers started by the supervisor; status goes to a unix socket."""
    worker = Worker(config, secrets, config_path=config_path, worker_index=index)
    sock = reuseport_socket(config.listen.host, config.listen.port, config.listen.backlog)
    await worker.start(sock, status_path=status_path)
    worker.install_signals()
    watcher = asyncio.create_task(worker.watch_parent(parent_pid))
    await worker.stopping.wait()
    watcher.cancel()
    await worker.drain()
