"""Mutable per-process runtime state: the current config generation, backend pool and counters.

The app's config AppKey is frozen at start; what a reload may change lives here and is replaced
by single assignments, so a request sees either the old or the new generation, never a mix.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from gpuproxy_proxy.config import BackendConfig, ProxyConfig
from gpuproxy_proxy.routing.backends import BackendPool


def client_timeout(config: ProxyConfig) -> aiohttp.ClientTimeout:
    # sock_read is the idle time between two reads, so long streams are fine as long as they
    # keep producing tokens; no total timeout for the same reason.
    return aiohttp.ClientTimeout(
        total=None,
        sock_connect=config.upstream.connect_timeout_seconds,
        sock_read=config.upstream.read_timeout_seconds,
    )


@dataclass(slots=True)
class Runtime:
    config: ProxyConfig
    pool: BackendPool
    timeout: aiohttp.ClientTimeout
    worker_index: int = 0
    generation: int = 1
    serving: bool = False  # the client port is open (set by the process layer)
    draining: bool = False
    connections_active: int = 0
    in_flight: int = 0
    connections_rejected: int = 0
    started_at: float = field(default_factory=time.time)
    # Backends found by discovery (routing/discovered.py); the pool is built from
    # config.backends plus these.
    discovered: list[BackendConfig] = field(default_factory=list)
    # Called with (old, new) after a reload, by the parts the app does not own (the server's
    # connection limits, the process's logging).
    listeners: list[Callable[[ProxyConfig, ProxyConfig], None]] = field(default_factory=list)

    def apply(self, config: ProxyConfig, pool: BackendPool) -> None:
        old = self.config
        self.pool = pool
        self.timeout = client_timeout(config)
        self.config = config
        self.generation += 1
        for listener in self.listeners:
            listener(old, config)


RUNTIME = web.AppKey("runtime", Runtime)
