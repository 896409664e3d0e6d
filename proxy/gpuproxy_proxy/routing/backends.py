"""Per-backend state (in flight, latency EWMA, active health, passive ejection) and the pool.

A pool is immutable once built; a config reload builds a new pool that reuses the state of
unchanged backends, and the router swaps it in with one assignment. Passive ejection counts
transport failures only (a client can provoke any HTTP status), never takes more than half of
the actively healthy backends out, and backs off exponentially while half-open probes fail.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from yarl import URL

from gpuproxy_proxy.config import (
    SIGNAL_STRATEGIES,
    BackendConfig,
    HealthCheckConfig,
    LoadBalancingConfig,
)
from gpuproxy_proxy.observability.metrics import ProxyMetrics
from gpuproxy_proxy.routing import hints as request_hints
from gpuproxy_proxy.routing import signalview
from gpuproxy_proxy.routing.affinity import ENGINE_BALANCERS, EngineBalancer
from gpuproxy_proxy.routing.balancer import Balancer, ewma, make_balancer
from gpuproxy_proxy.routing.signals import BackendSignals

# Passive ejection never takes more than this share of the actively healthy backends out of
# rotation: with one or two of them left, failures keep them in (and they keep being tried).
MAX_EJECTED_SHARE = 0.5
# Each failed half-open probe doubles the ejection, up to this (or the configured ejection
# period when that is longer).
MAX_EJECTION_SECONDS = 300.0
_MAX_DOUBLINGS = 20  # 2**20 periods is past any cap: no float overflow


class BackendState:
    """Mutable state of one configured backend, shared by every request routed to it."""

    __slots__ = (
        "_healthy_gauge", "active_healthy", "check_failures",
        "check_successes", "config", "consecutive_failures", "ejected_until", "ejections",
        "ewma_ms", "health_url", "host", "host_header", "in_flight", "last_check_error",
        "last_success", "name", "name_hash", "origin", "path_prefix", "peers", "picks", "port",
        "probing", "scheme", "signals", "signals_max_age", "use_ssl", "weight",
    )

    def __init__(self, config: BackendConfig, metrics: ProxyMetrics) -> None:
        url = URL(str(config.url))
        self.config = config
        self.name = config.name
        self.weight = config.weight
        self.origin = url.origin()
        self.scheme = url.scheme
        self.host = url.raw_host or ""
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.use_ssl = url.scheme == "https"
        self.host_header = _host_header(url)
        # A backend URL may carry a prefix (http://host/base); client paths are appended to it.
        self.path_prefix = url.raw_path.rstrip("/")
        self.health_url = self.origin.with_path(
            self.path_prefix + "/" + config.health_path.lstrip("/"), encoded=True
        )
        self.in_flight = 0
        self.ewma_ms: float | None = None
        self.active_healthy = True  # optimistic until the first check says otherwise
        self.check_failures = 0
        self.check_successes = 0
        self.consecutive_failures = 0
        self.ejected_until = 0.0
        self.ejections = 0  # in a row without a good answer in between: the backoff exponent
        self.probing = False
        # The backends of the pool this one is in (itself included), for the ejection cap;
        # set by BackendPool. Alone, a backend is its pool's last one and never ejected.
        self.peers: tuple[BackendState, ...] = (self,)
        self.last_check_error: str | None = None
        self.last_success = 0.0  # monotonic time of the last good answer to real traffic
        self._healthy_gauge = metrics.backend_healthy.labels(self.name)
        # Engine signals from the pod's scraper (routing/scraper.py), and how many more
        # requests this worker has in flight here than at that scrape (started - finished
        # since), so a burst between two scrapes spreads.
        self.signals: BackendSignals | None = None
        self.signals_max_age = 5.0
        self.picks = 0
        self.name_hash = request_hints.stable_hash(self.name.encode())
        signalview.register_gauges(metrics, self.name, lambda: self.signals,
                                   lambda: self.signals_max_age)
        # Read at scrape time: no locked inc/dec on every request.
        metrics.backend_requests_in_flight.labels(self.name).set_function(self._in_flight_now)
        self._healthy_gauge.set(1)

    def _in_flight_now(self) -> float:
        return float(self.in_flight)

    def apply_signals(self, signals: BackendSignals | None) -> None:
        """A new scrape: its counts include the requests picked before it."""
        if signals is not None and (self.signals is None
                                    or signals.scraped_at != self.signals.scraped_at):
            self.picks = 0
        self.signals = signals

    def serves(self, model: str, now: float, max_age: float) -> bool:
        """False only when a recent model list leaves the model out."""
        sig = self.signals
        if sig is None or sig.models is None or now - sig.models_at > max_age:
            return True
        return model in sig.models

    def same_target(self, config: BackendConfig) -> bool:
        return config.url == self.config.url and config.health_path == self.config.health_path

    def upstream_url(self, raw_path_qs: str) -> URL:
        return URL(f"{self.scheme}://{self.origin.raw_authority}{self.path_prefix}{raw_path_qs}",
                   encoded=True)

    # --- selection -------------------------------------------------------------------------
    def available(self, now: float) -> bool:
        if not self.active_healthy:
            return False
        if self.ejected_until:
            # Half-open after the ejection: exactly one probe request at a time.
            return now >= self.ejected_until and not self.probing
        return True

    def state(self, now: float) -> str:
        if not self.active_healthy:
            return "unhealthy"
        if self.ejected_until:
            return "ejected" if now < self.ejected_until else "half_open"
        return "healthy"

    def acquire(self) -> None:
        self.in_flight += 1
        self.picks += 1
        if self.ejected_until:
            self.probing = True

    def release(self) -> None:
        self.in_flight -= 1
        self.picks -= 1  # may go below 0: requests the scrape counted have finished

    def abandon(self) -> None:
        """Release a request that ended without an answer either way (client hung up)."""
        self.release()
        if self.probing:
            self.probing = False  # the half-open probe proved nothing: let another one try

    # --- passive outlier detection ---------------------------------------------------------
    def record_answer(self, status: int, latency_ms: float, alpha: float, now: float) -> None:
        """The backend answered, with any status: its transport works, so this never ejects
        (a client can provoke a 5xx) and it ends an ejection. Only answers below 500 feed the
        latency EWMA: a fast error says nothing about how fast the backend serves."""
        if status < 500:
            self.record_success(latency_ms, alpha, now)
        else:
            self._answered()

    def record_success(self, latency_ms: float, alpha: float, now: float = 0.0) -> None:
        self.ewma_ms = ewma(self.ewma_ms, latency_ms, alpha)
        self.last_success = now
        self._answered()

    def _answered(self) -> None:
        self.consecutive_failures = 0
        if self.ejected_until:
            self.ejected_until = 0.0
            self.ejections = 0
            self.probing = False
            self._publish()

    def record_failure(self, now: float, health: HealthCheckConfig) -> None:
        """A transport failure (connect error or timeout, read timeout, broken or invalid
        response): never call this for an HTTP status."""
        self.consecutive_failures += 1
        if self.ejected_until:
            if self.probing:
                # The half-open probe failed: eject again, twice as long as the last time.
                self.probing = False
                self.ejections += 1
                self.ejected_until = now + self.ejection_period(health)
        elif (self.consecutive_failures >= health.unhealthy_threshold
              and self._may_be_ejected()):
            self.ejections = 1
            self.ejected_until = now + health.ejection_seconds
        self._publish()

    def ejection_period(self, health: HealthCheckConfig) -> float:
        """How long the current ejection lasts: the configured period, doubled for each
        half-open probe that failed since, capped."""
        base = health.ejection_seconds
        doublings = min(max(self.ejections - 1, 0), _MAX_DOUBLINGS)
        return min(base * 2.0 ** doublings, max(base, MAX_EJECTION_SECONDS))

    def _may_be_ejected(self) -> bool:
        # O(backends), but only when a failure streak reaches the threshold.
        healthy = [p for p in self.peers if p.active_healthy]
        ejected = sum(1 for p in healthy if p.ejected_until)
        return ejected + 1 <= MAX_EJECTED_SHARE * len(healthy)

    # --- active health checks --------------------------------------------------------------
    def record_check(self, ok: bool, health: HealthCheckConfig, error: str | None = None) -> None:
        if ok:
            self.check_failures = 0
            self.check_successes += 1
            self.last_check_error = None
            if not self.active_healthy and self.check_successes >= health.healthy_threshold:
                self.active_healthy = True
        else:
            self.check_successes = 0
            self.check_failures += 1
            self.last_check_error = error
            if self.active_healthy and self.check_failures >= health.unhealthy_threshold:
                self.active_healthy = False
        self._publish()

    def _publish(self) -> None:
        self._healthy_gauge.set(1 if self.available(time.monotonic()) or self.probing else 0)

    def snapshot(self, now: float) -> dict[str, Any]:
        return {
            "state": self.state(now),
            "signals": signalview.describe(self.signals, self.picks, now,
                                           self.signals_max_age),
            "in_flight": self.in_flight,
            "weight": self.weight,
            "ewma_ms": None if self.ewma_ms is None else round(self.ewma_ms, 3),
            "consecutive_failures": self.consecutive_failures,
            "ejected_for_seconds": max(0.0, round(self.ejected_until - now, 3))
            if self.ejected_until else 0.0,
            "last_check_error": self.last_check_error,
        }


AnyBalancer = Balancer | EngineBalancer


def _make_strategy(name: str, lb: LoadBalancingConfig) -> AnyBalancer:
    engine = ENGINE_BALANCERS.get(name)
    return engine(lb) if engine is not None else make_balancer(name)  # type: ignore[arg-type]


class BackendPool:
    """The backends of one config generation plus the balancers that pick among them (the
    cluster's strategy and the per-model overrides)."""

    __slots__ = ("_decisions", "backends", "balancer", "by_name", "lb", "need_model",
                 "need_prefix", "need_session", "needs_hints", "per_model", "strategy")

    def __init__(self, backends: Sequence[BackendState], lb: LoadBalancingConfig,
                 metrics: ProxyMetrics | None = None) -> None:
        self.backends = tuple(backends)
        for state in self.backends:
            state.peers = self.backends
            state.signals_max_age = lb.signals.max_age_seconds
        self.by_name = {b.name: b for b in self.backends}
        self.lb = lb
        self.strategy = lb.strategy
        self.balancer: AnyBalancer = _make_strategy(lb.strategy, lb)
        self.per_model: dict[str, AnyBalancer] = {
            model: _make_strategy(name, lb) for model, name in lb.per_model.items()}
        used = {lb.strategy, *lb.per_model.values()}
        # Hints cost a few regex scans of the body: only what a strategy in use reads.
        self.need_model = bool(lb.per_model) or lb.signals_on
        self.need_prefix = "prefix_affinity" in used
        self.need_session = "session_affinity" in used
        self.needs_hints = self.need_model or self.need_prefix or self.need_session
        self._decisions: dict[tuple[str, str], Any] = {}
        if metrics is not None:
            for name in used & SIGNAL_STRATEGIES:
                for reason in ("signals", "connections", "affinity", "spill", "no_key"):
                    self._decisions[name, reason] = metrics.routing_decisions.labels(
                        name, reason)

    def hints_for(self, headers: Mapping[str, str], body: bytes) -> request_hints.RequestHints:
        model = request_hints.request_model(body) if body else None
        affinity = self.lb.affinity
        prefix = session = None
        if self.need_prefix and body:
            prefix = request_hints.prefix_key(body, model, affinity.prefix_bytes,
                                              affinity.prefix_max_bytes)
        if self.need_session:
            session = request_hints.session_key(headers, body, affinity.session_header)
        return request_hints.RequestHints(model, prefix, session)

    def choose(self, exclude: BackendState | None = None,
               hints: request_hints.RequestHints | None = None,
               avoid: Collection[BackendState] = (),
               avoid_names: Collection[str] = ()) -> BackendState | None:
        """The strategy's pick among the available backends, never `exclude`, one in `avoid`
        (tried already by this request) or one named in `avoid_names` (penalized, full)."""
        now = time.monotonic()
        if avoid or avoid_names:
            allowed = [b for b in self.backends if b is not exclude and b not in avoid
                       and b.name not in avoid_names]
        else:
            allowed = [b for b in self.backends if b is not exclude]
        candidates = [b for b in allowed if b.available(now)]
        if not candidates:
            # Passive ejection never leaves nothing to route to (the cap can be outrun when
            # active checks fail others later): all actively healthy backends, ejected or not.
            candidates = [b for b in allowed if b.active_healthy]
        balancer = self.balancer
        name = self.strategy
        model = hints.model if hints is not None else None
        if model is not None:
            # Model and LoRA-adapter affinity: only backends whose list has the model (or
            # whose list is unknown); when none has it, every one may answer (404 or not).
            max_age = 3 * self.lb.signals.models_interval_seconds
            serving = [b for b in candidates if b.serves(model, now, max_age)]
            if serving:
                candidates = serving
            override = self.per_model.get(model)
            if override is not None:
                balancer = override
                name = self.lb.per_model[model]
        if isinstance(balancer, EngineBalancer):
            chosen = balancer.pick_for(candidates, hints, now)
            counter = self._decisions.get((name, balancer.reason))
            if counter is not None and chosen is not None:
                counter.inc()
        else:
            chosen = balancer.pick(candidates)
        if chosen is not None:
            chosen.acquire()
        return chosen

    def any_available(self) -> bool:
        """Whether `choose` can find a backend (passively ejected ones are the fallback)."""
        return any(b.active_healthy for b in self.backends)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        return {b.name: b.snapshot(now) for b in self.backends}


def _host_header(url: URL) -> str:
    """host[:port] as sent in Host: never the URL's user:pass@ (config validation refuses
    those; a URL built some other way must still not leak them to the backend)."""
    host = url.raw_host or ""
    if ":" in host:
        host = f"[{host}]"  # IPv6 literal
    port = url.explicit_port
    return host if port is None else f"{host}:{port}"


def build_pool(
    backends: Sequence[BackendConfig], lb: LoadBalancingConfig, metrics: ProxyMetrics,
    previous: BackendPool | None = None,
) -> BackendPool:
    """Build a pool, keeping the live state of backends whose target did not change."""
    states = []
    for cfg in backends:
        old = previous.by_name.get(cfg.name) if previous is not None else None
        if old is not None and old.same_target(cfg):
            old.config = cfg
            old.weight = cfg.weight
            states.append(old)
        else:
            states.append(BackendState(cfg, metrics))
    if previous is not None:
        keep = {cfg.name for cfg in backends}
        for old in previous.backends:
            if old.name not in keep:
                metrics.backend_healthy.remove(old.name)
                signalview.remove_gauges(metrics, old.name)
                if old.in_flight == 0:
                    metrics.backend_requests_in_flight.remove(old.name)
    pool = BackendPool(states, lb, metrics)
    if (previous is not None and previous.strategy == lb.strategy
            and not isinstance(previous.balancer, EngineBalancer)):
        pool.balancer = previous.balancer  # keep rotation / smooth-WRR state across reloads
    return pool
