"""Admission and flow control: when every backend is saturated a request waits in a bounded
per-worker queue, served in weighted fair order across tenants and priority classes, and is
handed a freed slot through a future (no polling); past its deadline it gets 429 or 503."""

from __future__ import annotations

import asyncio
import heapq
import math
import time
from dataclasses import dataclass, field

from aiohttp import web

from gpuproxy_proxy.auth.principal import Principal
from gpuproxy_proxy.config import AdmissionConfig, PriorityClass
from gpuproxy_proxy.http.errors import json_error
from gpuproxy_proxy.observability.metrics import ProxyMetrics
from gpuproxy_proxy.routing.backends import BackendPool, BackendState

PRIORITY_HEADER = "x-gpuproxy-priority"


@dataclass(frozen=True, slots=True)
class Saturation:
    """When a backend counts as saturated: this worker's share of in-flight requests, and
    the engine's own KV-cache use and queue while its scraped signals are fresh."""

    per_backend: int
    max_kv: float = 1.0
    max_queue: int | None = None


def headroom(backend: BackendState, limits: Saturation, now: float) -> int:
    """Requests `backend` still takes from this worker before it is saturated: 0 when its
    fresh engine signals say the GPU is full (KV cache or queue over the limits)."""
    signals = backend.signals
    if signals is not None and signals.fresh(now, backend.signals_max_age):
        kv, waiting = signals.kv_usage, signals.waiting
        if (kv is not None and kv > limits.max_kv) or (
                limits.max_queue is not None and waiting is not None
                and waiting > limits.max_queue):
            return 0
    return limits.per_backend - backend.in_flight


def saturated(backend: BackendState, limits: Saturation, now: float) -> bool:
    return headroom(backend, limits, now) <= 0


@dataclass(slots=True, eq=False)
class Waiter:
    future: asyncio.Future[None]
    key: tuple[str, str]  # (priority class, tenant)
    start: float  # virtual start time: the queue's clock once this one is served
    finish: float  # the fair-queueing order
    seq: int
    enqueued: float = field(default_factory=time.monotonic)
    gone: bool = False  # left the queue (deadline, client gone) but still in the heap

    def __lt__(self, other: Waiter) -> bool:
        return (self.finish, self.seq) < (other.finish, other.seq)


class AdmissionQueue:
    """One worker's queue. Fairness is start-time fair queueing: each (class, tenant) key's
    requests advance its virtual finish time by 1/weight, and the smallest finish goes first,
    so a tenant's burst cannot starve a tenant that arrives later."""

    def __init__(self, config: AdmissionConfig, metrics: ProxyMetrics, workers: int) -> None:
        self._heap: list[Waiter] = []
        self._last_finish: dict[tuple[str, str], float] = {}
        self._queued: dict[tuple[str, str], int] = {}
        self._vtime = 0.0
        self._seq = 0
        self.depth = 0
        self.handoffs = 0  # slots handed to waiters that have not resumed yet
        self._wait = metrics.admission_wait_seconds
        self._rejections = {reason: metrics.admission_rejections.labels(reason)
                            for reason in ("queue_full", "deadline_tenant", "deadline_pool")}
        metrics.admission_queue_depth.set_function(lambda: float(self.depth))
        self.configure(config, workers)

    def configure(self, config: AdmissionConfig, workers: int) -> None:
        self.config = config
        # The setting is per pod: each worker takes its share of a backend (at least one).
        self.per_backend = max(1, math.ceil(config.max_in_flight_per_backend / workers))
        self.limits = Saturation(self.per_backend, config.max_kv_cache_usage,
                                 config.max_engine_queue)
        self.retry_after = {"Retry-After": str(config.retry_after_seconds)}

    # --- the hot path ------------------------------------------------------------------------
    def fast(self, pool: BackendPool) -> bool:
        """Admit at once: nobody waits and a backend has room (stops at the first that has)."""
        return not self.depth and not self.handoffs and self.has_capacity(pool)

    def has_capacity(self, pool: BackendPool) -> bool:
        now = time.monotonic()
        any_up = False
        for backend in pool.backends:
            if backend.available(now):
                any_up = True
                if not saturated(backend, self.limits, now):
                    return True
        return not any_up  # nothing up: forwarding answers 503 at once, do not queue

    def saturated_names(self, pool: BackendPool) -> frozenset[str]:
        """Backends the balancer should pass over for an admitted request (any strategy)."""
        now = time.monotonic()
        full = [b.name for b in pool.backends if saturated(b, self.limits, now)]
        return frozenset(full) if full else frozenset()

    def release(self, pool: BackendPool) -> None:
        """A forwarded request ended: hand its slot to the next waiter, if any."""
        if self.depth:
            self._dispatch(pool)

    # --- queueing ----------------------------------------------------------------------------
    def priority_of(self, principal: Principal, asked: str | None) -> str:
        """The header's class only when the principal is granted it, else the default."""
        if asked and asked in self.config.priorities and \
                _granted(self.config.priorities[asked], principal):
            return asked
        return self.config.default_priority

    async def wait(self, pool: BackendPool, tenant: str, priority: str,
                   request_id: str) -> web.Response | None:
        """Queue until a slot frees: None when admitted, else the refusal to send."""
        config = self.config
        if self.depth >= config.max_queue:
            self._rejections["queue_full"].inc()
            return json_error(503, "overloaded", "every backend is saturated and the admission "
                              "queue is full; retry later", request_id, self.retry_after)
        waiter = self._enqueue((priority, tenant), config.priorities[priority].weight)
        self._dispatch(pool)
        try:
            async with asyncio.timeout(config.queue_timeout_seconds):
                await waiter.future
        except TimeoutError:
            if not _handed(waiter):
                return self._expire(waiter, request_id)
        except asyncio.CancelledError:
            if _handed(waiter):
                self.handoffs -= 1
                self._dispatch(pool)  # pass the slot on to the next one
            else:
                self._leave(waiter)
            raise
        self.handoffs -= 1
        self._wait.observe(time.monotonic() - waiter.enqueued)
        return None

    def _enqueue(self, key: tuple[str, str], weight: float) -> Waiter:
        start = max(self._vtime, self._last_finish.get(key, 0.0))
        finish = start + 1.0 / weight
        self._last_finish[key] = finish
        self._seq += 1
        waiter = Waiter(asyncio.get_running_loop().create_future(), key, start, finish,
                        self._seq)
        heapq.heappush(self._heap, waiter)
        self.depth += 1
        self._queued[key] = self._queued.get(key, 0) + 1
        return waiter

    def _dispatch(self, pool: BackendPool) -> None:
        now = time.monotonic()
        free = sum(max(0, headroom(b, self.limits, now)) for b in pool.backends
                   if b.available(now)) - self.handoffs
        if not any(b.available(now) for b in pool.backends):
            free = self.depth  # nothing up: let them all through to a quick 503
        while free > 0 and self._heap:
            waiter = heapq.heappop(self._heap)
            if waiter.gone:
                continue
            self._leave(waiter)
            if waiter.future.done():
                continue  # cancelled, its task not resumed yet: it is leaving anyway
            self._vtime = max(self._vtime, waiter.start)
            waiter.future.set_result(None)
            self.handoffs += 1
            free -= 1
        if len(self._last_finish) > 4 * max(self.config.max_queue, 64):
            # Tenants at or behind the clock have no say in ordering any more.
            for key in [k for k, f in self._last_finish.items() if f <= self._vtime]:
                del self._last_finish[key]

    def _leave(self, waiter: Waiter) -> None:
        if waiter.gone:
            return
        waiter.gone = True
        self.depth -= 1
        left = self._queued[waiter.key] - 1
        if left:
            self._queued[waiter.key] = left
        else:
            del self._queued[waiter.key]

    def _expire(self, waiter: Waiter, request_id: str) -> web.Response:
        # Over its fair share of the queue: the tenant is told to slow down (429); otherwise
        # the pool is simply full (503). Both say when to come back.
        mine = self._queued.get(waiter.key, 0)
        over = len(self._queued) > 1 and mine > self.depth / len(self._queued)
        self._leave(waiter)
        if over:
            self._rejections["deadline_tenant"].inc()
            return json_error(429, "queue_share_exceeded", "your requests waited past "
                              "admission.queue_timeout_seconds while using more than your "
                              "share of the queue; slow down", request_id, self.retry_after)
        self._rejections["deadline_pool"].inc()
        return json_error(503, "overloaded", "every backend stayed saturated for "
                          "admission.queue_timeout_seconds; retry later", request_id,
                          self.retry_after)

    def snapshot(self) -> dict[str, int]:
        return {"queue_depth": self.depth, "queued_tenants": len(self._queued),
                "per_backend_limit": self.per_backend}


def _handed(waiter: Waiter) -> bool:
    return waiter.future.done() and not waiter.future.cancelled()


def _granted(cls: PriorityClass, principal: Principal) -> bool:
    return bool((principal.user_id and principal.user_id in cls.users)
                or (principal.team and principal.team in cls.teams)
                or (principal.api_key_id and principal.api_key_id in cls.api_keys))


def tenant_of(principal: Principal, client_ip: str) -> str:
    """The fairness key: API key id, else user, else client IP."""
    if principal.api_key_id:
        return "k:" + principal.api_key_id
    if principal.user_id:
        return "u:" + principal.user_id
    return "ip:" + client_ip


ADMISSION = web.AppKey("admission", AdmissionQueue)
