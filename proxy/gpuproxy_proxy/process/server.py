"""One worker process: the client port and the admin API's port (both SO_REUSEPORT) and its
status endpoints, GC control, heartbeats, the limits a reload changes, and the SIGTERM drain
(lifecycle.py) applied to the connections (http/frontend.py)."""

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

from aiohttp import web

from gpuproxy_proxy.app import build_app
from gpuproxy_proxy.appkeys import METRICS
from gpuproxy_proxy.auth.authenticator import AUTHENTICATOR
from gpuproxy_proxy.config import ProxyConfig, Secrets
from gpuproxy_proxy.http.adminlistener import AdminApiListener
from gpuproxy_proxy.http.frontend import ClientPort
from gpuproxy_proxy.observability.logging import reconfigure_logging
from gpuproxy_proxy.observability.status import GC_MONITOR, LocalSource, build_status_app
from gpuproxy_proxy.process.gcwatch import (
    FullCollectionsOff,
    GcMonitor,
    freeze_after_warmup,
    freeze_periodically,
)
from gpuproxy_proxy.process.heartbeat import DRAINING, SERVING, send_beats
from gpuproxy_proxy.process.lifecycle import DrainPlan, ProcessLifecycle, drain
from gpuproxy_proxy.routing.discovered import DISCOVERY_FILE
from gpuproxy_proxy.routing.discovery import SNAPSHOT_NAME as DISCOVERY_SNAPSHOT
from gpuproxy_proxy.routing.scraper import SIGNALS_FILE, SNAPSHOT_NAME
from gpuproxy_proxy.runtime import RUNTIME, Runtime

log = logging.getLogger("gpuproxy.server")

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


def reuseport_socket(host: str, port: int, backlog: int,
                     field: str = "listen.port") -> socket.socket:
    """A listening socket every worker binds on its own; the kernel spreads connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    # Accepted sockets inherit it on Linux: SSE chunks leave at once.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _bind(sock, host, port, field)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


class Worker:
    """The client-port app of one process plus its status endpoints."""

    def __init__(self, config: ProxyConfig, secrets: Secrets, *, config_path: Path | None = None,
                 worker_index: int = 0) -> None:
        self.config = config
        self.app = build_app(config, secrets, config_path=config_path, worker_index=worker_index)
        # A client that hangs up cancels its handler, which closes the upstream request: the
        # GPU stops generating for nobody (http/protocol.py).
        self.client_port = ClientPort(self.app)
        self.status_runner: web.AppRunner | None = None
        self.admin_api: AdminApiListener | None = None
        self.gc_monitor = GcMonitor(self.app[METRICS])
        self._full_gc_off = FullCollectionsOff()
        self.app[GC_MONITOR] = self.gc_monitor
        self.stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._freezer: asyncio.Task[None] | None = None
        self.runtime.listeners.append(self._on_reload)

    @property
    def runtime(self) -> Runtime:
        return self.app[RUNTIME]

    def _on_reload(self, old: ProxyConfig, new: ProxyConfig) -> None:
        # The connection limits are the Frontend's own listener.
        if old.logging != new.logging:
            reconfigure_logging(new.logging)
        if (old.limits.gc_freeze_interval_seconds != new.limits.gc_freeze_interval_seconds
                and not self.runtime.draining):
            self._start_freezer(new.limits.gc_freeze_interval_seconds)

    def _open_connections(self) -> int:
        return self.runtime.connections_active

    def _start_freezer(self, interval: float) -> None:
        if self._freezer is not None:
            self._freezer.cancel()
            self._freezer = None
        if interval > 0:
            self._full_gc_off.disable()
            self._freezer = asyncio.create_task(
                freeze_periodically(interval, connections=self._open_connections),
                name="gc-freeze")
        else:
            self._full_gc_off.restore()

    async def start(self, sock: socket.socket, *, admin: socket.socket | None = None,
                    status_path: Path | None = None,
                    admin_api: socket.socket | None = None) -> None:
        """Serve clients on `sock`; status on an admin TCP socket or a worker status socket;
        the admin API on `admin_api` (listen.admin_api_port) when given."""
        access = logging.getLogger("gpuproxy.access") if self.config.logging.access_log else None
        await self.client_port.start(sock, self.config.listen.backlog, access)
        if admin_api is not None:
            self.admin_api = AdminApiListener(self.app)  # after the services: the Authenticator
            await self.admin_api.start(admin_api)
        else:
            auth = self.app[AUTHENTICATOR]
            if auth.admin_enabled or auth.admin_refused:
                log.warning("an admin token is set (%s) but listen.admin_api_port is not: "
                            "the admin API is off; set listen.admin_api_port (e.g. 9091) to "
                            "serve it", auth.admin_token_source)
        self.runtime.serving = True
        if admin is not None or status_path is not None:
            status_app = build_status_app([LocalSource(self.app)],
                                          ProcessLifecycle(self.runtime),
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
        self._start_freezer(self.runtime.config.limits.gc_freeze_interval_seconds)

    def send_heartbeats(self, fd: int) -> None:
        """Beat to the supervisor from this loop (a hung loop stops beating)."""
        runtime = self.runtime
        self._tasks.append(asyncio.create_task(send_beats(
            fd, lambda: DRAINING if runtime.draining else SERVING,
            lambda: runtime.config.limits.worker_heartbeat_timeout_seconds,
        ), name="heartbeat"))

    async def drain(self) -> None:
        """Not ready at once, then the drain phases (lifecycle.py) with the settings in force
        now, then the cleanup contexts (metering flush)."""
        runtime = self.runtime
        runtime.draining = True
        log.info("draining: %d connections, %d requests in flight",
                 runtime.connections_active, runtime.in_flight)
        if self._freezer is not None:
            self._freezer.cancel()
        self.gc_monitor.uninstall()
        self._full_gc_off.restore()
        frontend = self.client_port.frontend
        assert frontend is not None, "start() first"
        report = await drain(frontend, DrainPlan.from_limits(runtime.config.limits))
        if self.admin_api is not None:
            await self.admin_api.close()  # before the services it uses are cleaned up
        await self.client_port.close()
        if self.status_runner is not None:
            await self.status_runner.cleanup()
        for task in self._tasks:  # heartbeats last: this loop ran until here
            task.cancel()
        log.info("drained in %.1fs: %d idle connections closed, %d cut",
                 report.seconds, report.idle_closed, report.cut)

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


def admin_api_socket(config: ProxyConfig) -> socket.socket | None:
    """This worker's socket of the admin API, None when listen.admin_api_port is off."""
    listen = config.listen
    if not listen.admin_api_enabled:
        return None
    assert listen.admin_api_port is not None
    return reuseport_socket(listen.host, listen.admin_api_port, 128, "listen.admin_api_port")


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
    await worker.start(sock, admin=admin_socket(config), admin_api=admin_api_socket(config))
    worker.install_signals()
    log.info("serving %s on %s:%d (admin %d, admin API %s), %d backends, strategy %s",
             "HTTPS" if config.listen.tls is not None else "plain HTTP",
             config.listen.host, config.listen.port, config.listen.admin_port,
             config.listen.admin_api_port or "off", len(config.backends),
             config.load_balancing.strategy)
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
                       index: int, status_path: Path, parent_pid: int,
                       heartbeat_fd: int | None = None) -> None:
    """One of N workers started by the supervisor; status goes to a unix socket, heartbeats
    to a pipe."""
    worker = Worker(config, secrets, config_path=config_path, worker_index=index)
    # The supervisor scrapes the backends once for the pod and publishes next to the status
    # sockets (routing/scraper.py): the workers only read that file.
    worker.app[SIGNALS_FILE] = status_path.parent / SNAPSHOT_NAME
    worker.app[DISCOVERY_FILE] = status_path.parent / DISCOVERY_SNAPSHOT
    sock = reuseport_socket(config.listen.host, config.listen.port, config.listen.backlog)
    await worker.start(sock, status_path=status_path, admin_api=admin_api_socket(config))
    worker.install_signals()
    if heartbeat_fd is not None:
        worker.send_heartbeats(heartbeat_fd)
    watcher = asyncio.create_task(worker.watch_parent(parent_pid))
    await worker.stopping.wait()
    watcher.cancel()
    await worker.drain()
