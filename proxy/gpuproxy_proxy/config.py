"""The proxy's configuration: one frozen model, read from the YAML file the operator renders.

Secrets never live in the file; they come from the files `secret_files` names (re-read when
they change, see secretfiles.py) or else from the environment (see `Secrets`).
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    ValidationError,
    field_validator,
    model_validator,
)

Strategy = Literal[
    "round_robin",
    "weighted_round_robin",
    "least_connections",
    "least_response_time",
    "equal_weighted",
    # Engine-aware (routing/signals.py, routing/affinity.py):
    "least_load",
    "prefix_affinity",
    "session_affinity",
]
# What happens while Redis is unreachable: an in-process limiter ("local"),
# let everything through ("open"), or reject with 503 ("closed").
RedisFailureMode = Literal["local", "open", "closed"]
# What the metering spool does when it is full (see MeteringConfig.spool_max_bytes).
SpoolFullPolicy = Literal["reject", "drop_oldest"]
SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TlsConfig(_Frozen):
    """HTTPS on the client port; the admin port stays plain HTTP (the kubelet's probes).

    The files are a mounted kubernetes.io/tls Secret (tls.crt, tls.key, as cert-manager writes
    them); they are polled and a rotated pair is used by new connections (http/tls.py)."""

    cert_file: Annotated[str, Field(min_length=1)]
    key_file: Annotated[str, Field(min_length=1)]
    # TLS 1.2 with ECDHE and AEAD ciphers only (Mozilla "intermediate"), or TLS 1.3 only.
    min_version: Literal["1.2", "1.3"] = "1.2"
    # A connection that has not finished its handshake by then is closed: until it does, it is
    # invisible to the connection cap and the keep-alive sweep.
    handshake_timeout_seconds: Annotated[float, Field(gt=0, le=120)] = 10.0


class ListenConfig(_Frozen):
    host: str = "0.0.0.0"
    port: Annotated[int, Field(ge=1, le=65535)] = 8080
    # /health, /ready, /stats and /metrics are served here, never on the client port.
    admin_port: Annotated[int, Field(ge=1, le=65535)] = 9090
    # The admin API (/admin/keys) on a listener of its own, bound by every worker like the
    # client port; unset or 0: no admin API (the operator sets it with an admin token).
    admin_api_port: Annotated[int, Field(ge=0, le=65535)] | None = None
    backlog: Annotated[int, Field(ge=1)] = 65535
    # Unset: the client port serves plain HTTP (the operator decides whether that is allowed).
    tls: TlsConfig | None = None

    @property
    def admin_api_enabled(self) -> bool:
        return bool(self.admin_api_port)

    @model_validator(mode="after")
    def _distinct_ports(self) -> ListenConfig:
        if self.admin_api_port and self.admin_api_port in (self.port, self.admin_port):
            raise ValueError("listen.admin_api_port must differ from listen.port and "
                             "listen.admin_port: pick another port, or 0 to turn the admin "
                             "API off")
        return self


class BackendConfig(_Frozen):
    name: Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)]
    url: HttpUrl
    weight: Annotated[int, Field(ge=1, le=1000)] = 1
    health_path: str = "/health"
    labels: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _no_credentials_in_url(self) -> BackendConfig:
        # They would travel in clear to the backend (and into logs); the CRD refuses them too.
        if self.url.username is not None or self.url.password is not None:
            raise ValueError(
                f"backend {self.name!r}: url must not contain credentials (user:pass@); "
                "remove them from the URL (the proxy never sends credentials taken from a "
                "backend URL)")
        return self


class SignalsConfig(_Frozen):
    """Engine signals: each backend's /metrics and /v1/models, scraped once per pod."""

    # None: on when a strategy in use needs them (least_load, prefix_affinity,
    # session_affinity); true also gives the others model affinity and /stats signals.
    enabled: bool | None = None
    interval_seconds: Annotated[float, Field(gt=0)] = 1.0
    models_interval_seconds: Annotated[float, Field(gt=0)] = 10.0
    timeout_seconds: Annotated[float, Field(gt=0)] = 0.5
    # An engine signal older than this is ignored (the backend is scored by connections);
    # model lists live 3 x models_interval_seconds.
    max_age_seconds: Annotated[float, Field(gt=0)] = 5.0
    metrics_path: str = "/metrics"


class LeastLoadConfig(_Frozen):
    """least_load's score: waiting * queue_weight + running * running_weight
    + kv_cache_usage (0..1) * kv_cache_weight; running includes this worker's net change in
    requests sent there since the scrape."""

    queue_weight: Annotated[float, Field(ge=0)] = 2.0
    running_weight: Annotated[float, Field(ge=0)] = 1.0
    kv_cache_weight: Annotated[float, Field(ge=0)] = 4.0


class AffinityConfig(_Frozen):
    """prefix_affinity and session_affinity: rendezvous hashing with a load cap."""

    # A backend takes an affine request while its load (requests waiting + running) stays
    # under load_factor x the mean load (+1) plus load_slack; past it the request goes to the
    # next backend in the key's order. The slack is absolute because a few more sequences in
    # a batch cost far less than a cache miss (a whole prefill); SGLang's cache-aware router
    # has the same kind of threshold (balance_abs_threshold, 32).
    load_factor: Annotated[float, Field(ge=1.0)] = 1.25
    load_slack: Annotated[int, Field(ge=0)] = 8
    # Without a leading system message the key is this many bytes of the messages / prompt.
    prefix_bytes: Annotated[int, Field(ge=16, le=65536)] = 512
    # A system message longer than this is keyed on its first prefix_max_bytes.
    prefix_max_bytes: Annotated[int, Field(ge=16, le=1048576)] = 8192
    session_header: str = "x-session-id"


class LoadBalancingConfig(_Frozen):
    strategy: Strategy = "least_connections"
    # Smoothing factor for the least_response_time latency EWMA.
    ewma_alpha: Annotated[float, Field(gt=0, le=1)] = 0.3
    # A strategy per requested model (the body's "model"), overriding `strategy`.
    per_model: dict[str, Strategy] = Field(default_factory=dict)
    signals: SignalsConfig = Field(default_factory=SignalsConfig)
    least_load: LeastLoadConfig = Field(default_factory=LeastLoadConfig)
    affinity: AffinityConfig = Field(default_factory=AffinityConfig)

    @property
    def signals_on(self) -> bool:
        if self.signals.enabled is not None:
            return self.signals.enabled
        used = {self.strategy, *self.per_model.values()}
        return bool(used & SIGNAL_STRATEGIES)


# Strategies that read engine signals or request hints.
SIGNAL_STRATEGIES = frozenset({"least_load", "prefix_affinity", "session_affinity"})


class RetryConfig(_Frozen):
    """Retrying a refused request on another backend before any byte went to the client."""

    # Extra attempts after the first, each on a backend not tried yet for this request.
    max_attempts: Annotated[int, Field(ge=0, le=10)] = 2
    # Backend statuses that mean "not now" (nothing was generated): retried like a refused
    # connection. The refused answer's body is read and dropped.
    on_statuses: list[Annotated[int, Field(ge=400, le=599)]] = Field(
        default_factory=lambda: [429, 503])
    # Retry budget (Envoy/Linkerd style): retries stay under this share of the requests of the
    # last window_seconds, plus min_per_second, so retries never amplify an overload.
    budget_ratio: Annotated[float, Field(ge=0, le=1)] = 0.2
    min_per_second: Annotated[float, Field(ge=0)] = 10.0
    window_seconds: Annotated[int, Field(ge=1, le=300)] = 10
    # A backend's Retry-After keeps it out of the picks for that long, at most this (0 = off).
    max_penalty_seconds: Annotated[float, Field(ge=0)] = 30.0


class UpstreamConfig(_Frozen):
    connect_timeout_seconds: Annotated[float, Field(gt=0)] = 5.0
    read_timeout_seconds: Annotated[float, Field(gt=0)] = 300.0
    max_connections_per_backend: Annotated[int, Field(ge=1)] = 1024
    retry_on_connect_failure: bool = True
    retry: RetryConfig = Field(default_factory=RetryConfig)
    # Longest a request (a stream included) may take end to end; 0 = no limit. The pod's
    # termination grace period is sized from it, so a drain never cuts a stream short.
    max_request_seconds: Annotated[float, Field(ge=0)] = 0.0


class PriorityClass(_Frozen):
    """One admission priority class: its share of the queue and who may ask for it."""

    weight: Annotated[float, Field(gt=0, le=1000)] = 1.0
    # Principals allowed to send `x-gpuproxy-priority: <class>`; the header of anyone else is
    # ignored (a client cannot raise itself). Empty lists: nobody may ask for it.
    users: list[str] = Field(default_factory=list)
    teams: list[str] = Field(default_factory=list)
    api_keys: list[str] = Field(default_factory=list)


class AdmissionConfig(_Frozen):
    """Queueing in the proxy when every backend is saturated (routing/admission.py)."""

    enabled: bool = False
    # Requests in flight one backend takes from the whole pod (split over its workers) before
    # it counts as saturated.
    max_in_flight_per_backend: Annotated[int, Field(ge=1)] = 64
    # A backend whose fresh engine signals (routing/scraper.py) show more KV-cache use or more
    # waiting requests than these is saturated too, whatever our in-flight count says (the
    # Gateway API Inference Extension's defaults); 1.0 / None turn either test off.
    max_kv_cache_usage: Annotated[float, Field(gt=0, le=1)] = 0.8
    max_engine_queue: Annotated[int, Field(ge=0)] | None = 5
    # Waiting requests per worker; one more is refused at once with 503.
    max_queue: Annotated[int, Field(ge=0)] = 1000
    queue_timeout_seconds: Annotated[float, Field(gt=0)] = 30.0
    retry_after_seconds: Annotated[int, Field(ge=1, le=3600)] = 2
    # Classes by name; "default" is every request's class unless a granted header says else.
    priorities: dict[str, PriorityClass] = Field(
        default_factory=lambda: {"default": PriorityClass()})
    default_priority: str = "default"

    @model_validator(mode="after")
    def _default_known(self) -> AdmissionConfig:
        if self.default_priority not in self.priorities:
            raise ValueError(f"default_priority {self.default_priority!r} is not one of "
                             "admission.priorities")
        return self


class HealthCheckConfig(_Frozen):
    interval_seconds: Annotated[float, Field(gt=0)] = 5.0
    timeout_seconds: Annotated[float, Field(gt=0)] = 2.0
    unhealthy_threshold: Annotated[int, Field(ge=1)] = 3
    healthy_threshold: Annotated[int, Field(ge=1)] = 1
    ejection_seconds: Annotated[float, Field(gt=0)] = 30.0


class AuthConfig(_Frozen):
    enabled: bool = True
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_leeway_seconds: Annotated[int, Field(ge=0)] = 30
    # How long a looked-up API key is used without asking the database again. With Redis,
    # revocations are pushed and this only bounds a revocation missed while Redis was down.
    api_key_cache_seconds: Annotated[float, Field(ge=0)] = 30.0
    # No cached key is served longer than this after it was read from the database, not even
    # while the database is down (then 503): the revocation bound during a database outage.
    api_key_cache_max_stale_seconds: Annotated[float, Field(ge=0)] = 300.0
    # A key the cache cannot answer waits at most this long for the database, then 503.
    api_key_lookup_timeout_seconds: Annotated[float, Field(gt=0)] = 2.0
    # Cache misses waiting for the database per worker (one per distinct key); beyond it,
    # 503 at once, so a flood of unknown keys holds neither requests nor pool connections.
    api_key_max_pending_lookups: Annotated[int, Field(ge=1)] = 256
    # After the JWT secret changes, tokens signed with the previous one stay valid this long.
    jwt_rotation_overlap_seconds: Annotated[float, Field(ge=0)] = 3600.0


class TokenLimits(_Frozen):
    """Tokens (prompt + completion) per window for each scope; None or 0: no limit."""

    per_api_key: Annotated[int, Field(ge=0)] | None = None
    per_user: Annotated[int, Field(ge=0)] | None = None
    per_team: Annotated[int, Field(ge=0)] | None = None

    @property
    def any(self) -> bool:
        return bool(self.per_api_key or self.per_user or self.per_team)


class RateLimitConfig(_Frozen):
    enabled: bool = True
    per_ip: Annotated[int, Field(ge=1)] = 1000
    per_user: Annotated[int, Field(ge=1)] = 10000
    per_api_key: Annotated[int, Field(ge=1)] = 100000
    window_seconds: Annotated[int, Field(ge=1)] = 60
    on_redis_failure: RedisFailureMode = "local"
    trusted_proxies: list[str] = Field(default_factory=list)
    # Token limits (limits/tokens.py): a request reserves its prompt estimate plus max_tokens
    # (or default_max_tokens) in fixed windows of one minute and one UTC day; the answer's
    # real usage settles the reservation.
    tokens_per_minute: TokenLimits = Field(default_factory=TokenLimits)
    tokens_per_day: TokenLimits = Field(default_factory=TokenLimits)
    default_max_tokens: Annotated[int, Field(ge=1)] = 1024

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        for cidr in value:
            ipaddress.ip_network(cidr, strict=False)
        return value


class ModelPrice(_Frozen):
    """US dollars per one million tokens."""

    input: Annotated[float, Field(ge=0)] = 0.0
    output: Annotated[float, Field(ge=0)] = 0.0


class BudgetsConfig(_Frozen):
    """Budgets per API key, user and team (set through the admin API, kept in Redis and
    PostgreSQL; limits/budgets.py). Off: no budget is checked."""

    enabled: bool = False
    # Model name -> price; a model not listed costs `default_price`.
    prices: dict[str, ModelPrice] = Field(default_factory=dict)
    default_price: ModelPrice = Field(default_factory=ModelPrice)
    # A stream whose running count passes its reservation asks Redis for this many more tokens
    # (or their price), at most once per `stream_check_seconds`; refused: the stream is cut.
    stream_extend_tokens: Annotated[int, Field(ge=1)] = 64
    stream_check_seconds: Annotated[float, Field(gt=0)] = 1.0
    # A reservation not settled within this long (its proxy died) is released by Redis.
    reservation_ttl_seconds: Annotated[float, Field(gt=0)] = 900.0


class RedisConfig(_Frozen):
    url: str = "redis://127.0.0.1:6379/0"
    socket_timeout_seconds: Annotated[float, Field(gt=0)] = 0.25


class DatabaseConfig(_Frozen):
    host: str
    port: Annotated[int, Field(ge=1, le=65535)] = 6432
    database: str = "gpuproxy"
    sslmode: SslMode = "prefer"
    pool_min_size: Annotated[int, Field(ge=0)] = 1
    pool_max_size: Annotated[int, Field(ge=1)] = 10


class MeteringConfig(_Frozen):
    enabled: bool = True
    batch_size: Annotated[int, Field(ge=1)] = 500
    flush_interval_seconds: Annotated[float, Field(gt=0)] = 1.0
    max_buffered_records: Annotated[int, Field(ge=1)] = 100000
    # A local spool (an emptyDir that survives container restarts): every admitted request is
    # on disk before its response starts, and replayed after a crash. None: memory only.
    # Read at start (a reload does not move it).
    spool_dir: str | None = None
    # Bound of the spool on disk, shared evenly by the workers; when reached, either refuse
    # new requests with 503 ("reject") or delete the oldest segment ("drop_oldest").
    spool_max_bytes: Annotated[int, Field(ge=64 * 1024)] = 256 * 1024 * 1024
    on_spool_full: SpoolFullPolicy = "reject"
    # fdatasync the spool once per flush interval (off the event loop), so a node crash, not
    # only a process crash, loses at most that interval of admitted records.
    spool_fsync: bool = True
    # A long stream writes how far it got this often, so a crash settles it with that count.
    progress_interval_seconds: Annotated[float, Field(gt=0)] = 5.0
    # Daily partitions of usage_records older than this are dropped.
    retention_days: Annotated[int, Field(ge=1)] = 90


class LimitsConfig(_Frozen):
    max_connections_per_worker: Annotated[int, Field(ge=1)] = 30000
    max_in_flight_per_worker: Annotated[int, Field(ge=1)] = 10000
    max_body_bytes: Annotated[int, Field(ge=1)] = 10 * 1024 * 1024
    keepalive_timeout_seconds: Annotated[float, Field(gt=0)] = 75.0
    # Client-side deadlines (408 with Connection: close, or an abort for writes), so no client
    # holds a connection, an in-flight slot or a backend connection by being slow. The head:
    # from its first byte to its blank line (a slowloris is cut here, not at the keep-alive
    # timeout).
    request_head_timeout_seconds: Annotated[float, Field(gt=0)] = 10.0
    # The body, from the end of the head (or from the 100 Continue) to its last byte: a total
    # bound, plus a minimum average rate counted after a grace period, as Apache's
    # mod_reqtimeout does (body=grace,MinRate=rate), so a stalled upload ends after about
    # the grace period, not the total. 0 turns the rate check off.
    body_read_timeout_seconds: Annotated[float, Field(gt=0)] = 60.0
    body_min_bytes_per_second: Annotated[int, Field(ge=0)] = 1024
    body_min_rate_grace_seconds: Annotated[float, Field(gt=0)] = 10.0
    # A client whose write buffer stays above the high-water mark this long (it reads nothing,
    # or less than ~48 KiB in that time), or whose closing connection cannot flush: both
    # sides are aborted, the backend connection is not reused, the handler is cancelled.
    client_write_timeout_seconds: Annotated[float, Field(gt=0)] = 30.0
    shutdown_grace_seconds: Annotated[float, Field(ge=0)] = 50.0
    # After SIGTERM, keep accepting (answering with Connection: close) while /ready says 503,
    # so endpoints stop routing here before the listener closes. Part of the grace period.
    drain_delay_seconds: Annotated[float, Field(ge=0)] = 0.0
    # After the drain delay, idle keep-alive connections are closed spread over this long
    # (not all at once, so clients do not reconnect in one burst).
    idle_close_seconds: Annotated[float, Field(ge=0)] = 5.0
    # A worker that has not reported for this long is considered hung: the supervisor
    # restarts it and /health fails meanwhile.
    worker_heartbeat_timeout_seconds: Annotated[float, Field(gt=0)] = 30.0
    # Long-lived objects (idle connections) are moved out of the collector's reach this often,
    # and automatic full collections are off meanwhile, so many open connections never turn
    # into long GC pauses; 0 keeps CPython's default collector (after one freeze at start).
    gc_freeze_interval_seconds: Annotated[float, Field(ge=0)] = 1.0


class ReloadConfig(_Frozen):
    # The file is polled (mtime/inode/size): Kubernetes swaps a ConfigMap volume by symlink,
    # which inotify on the file itself does not see.
    enabled: bool = True
    interval_seconds: Annotated[float, Field(gt=0)] = 2.0


class LoggingConfig(_Frozen):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = True
    # One line per request; off by default because it costs CPU on the hot path.
    access_log: bool = False


class SecretFilesConfig(_Frozen):
    """Files holding the secrets (mounted Kubernetes Secret keys), re-read when they change
    so a rotation needs no restart; a secret without a file comes from its environment
    variable (see `Secrets`)."""

    jwt_secret: str | None = None
    admin_token: str | None = None
    db_user: str | None = None
    db_password: str | None = None
    redis_password: str | None = None


class DiscoverySourceConfig(_Frozen):
    """Backends from a Service's (or a label selector's) EndpointSlices in the namespace."""

    name: Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=30)]
    service: str | None = None
    selector: str | None = None  # a labelSelector over EndpointSlices, e.g. "app=vllm"
    # The EndpointSlice port's name, or its number; None: the slice's only port.
    port: int | str | None = None
    scheme: Literal["http", "https"] = "http"
    health_path: str = "/health"
    weight: Annotated[int, Field(ge=1, le=1000)] = 1

    @model_validator(mode="after")
    def _one_target(self) -> DiscoverySourceConfig:
        if (self.service is None) == (self.selector is None):
            raise ValueError(f"discovery source {self.name!r}: set service or selector, not both")
        return self

    @property
    def label_selector(self) -> str:
        if self.service is not None:
            return f"kubernetes.io/service-name={self.service}"
        return self.selector or ""


class DiscoveryApiConfig(_Frozen):
    """Where the Kubernetes API is; the defaults are the in-cluster ServiceAccount's."""

    url: str | None = None  # None: https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT
    token_file: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    ca_file: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")
    watch_timeout_seconds: Annotated[int, Field(ge=1, le=3600)] = 290


class DiscoveryConfig(_Frozen):
    """Backend discovery: the proxy watches EndpointSlices itself (routing/discovery.py)."""

    sources: list[DiscoverySourceConfig] = Field(default_factory=list)
    namespace: str | None = None  # None: the pod's own (the ServiceAccount's namespace file)
    api: DiscoveryApiConfig = Field(default_factory=DiscoveryApiConfig)

    @model_validator(mode="after")
    def _unique_sources(self) -> DiscoveryConfig:
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError("discovery source names must be unique")
        return self


class ProxyConfig(_Frozen):
    """Everything one proxy pod needs, except secrets (those are files or env vars)."""

    listen: ListenConfig = Field(default_factory=ListenConfig)
    workers: Annotated[int, Field(ge=1, le=256)] = 1
    backends: list[BackendConfig] = Field(default_factory=list)
    load_balancing: LoadBalancingConfig = Field(default_factory=LoadBalancingConfig)
    upstream: UpstreamConfig = Field(default_factory=UpstreamConfig)
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)
    health_check: HealthCheckConfig = Field(default_factory=HealthCheckConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    rate_limits: RateLimitConfig = Field(default_factory=RateLimitConfig)
    budgets: BudgetsConfig = Field(default_factory=BudgetsConfig)
    redis: RedisConfig | None = None
    database: DatabaseConfig | None = None
    metering: MeteringConfig = Field(default_factory=MeteringConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    reload: ReloadConfig = Field(default_factory=ReloadConfig)
    secret_files: SecretFilesConfig = Field(default_factory=SecretFilesConfig)
    discovery: DiscoveryConfig = Field(default_factory=DiscoveryConfig)

    @model_validator(mode="after")
    def _unique_backends(self) -> ProxyConfig:
        names = [b.name for b in self.backends]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"backend names must be unique; repeated: {', '.join(duplicates)}")
        return self


class Secrets(_Frozen):
    """Secrets from the environment; the operator wires them from Kubernetes Secrets."""

    jwt_secret: str | None = None
    admin_token: str | None = None
    db_user: str | None = None
    db_password: str | None = None
    redis_password: str | None = None

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Secrets:
        source = os.environ if env is None else env
        return cls(
            jwt_secret=source.get("GPUPROXY_JWT_SECRET") or None,
            admin_token=source.get("GPUPROXY_ADMIN_TOKEN") or None,
            db_user=source.get("GPUPROXY_DB_USER") or None,
            db_password=source.get("GPUPROXY_DB_PASSWORD") or None,
            redis_password=source.get("GPUPROXY_REDIS_PASSWORD") or None,
        )


SECRET_ENV_VARS = (
    "GPUPROXY_JWT_SECRET",
    "GPUPROXY_ADMIN_TOKEN",
    "GPUPROXY_DB_USER",
    "GPUPROXY_DB_PASSWORD",
    "GPUPROXY_REDIS_PASSWORD",
)


# Sections a running proxy applies from a changed config file without a restart (reload.py);
# a change anywhere else needs new processes, so only that part goes into the pod-template
# hash the operator computes (restart_key). Not reloadable: listen and workers (sockets and
# processes), redis and database (connections; their credentials do rotate live, see
# secretfiles.py) and secret_files (the mounts themselves).
RELOADABLE_SECTIONS = frozenset({
    "backends", "load_balancing", "upstream", "health_check", "auth", "rate_limits", "budgets",
    "limits", "admission",
    "metering", "logging", "reload",
})
# Fields inside reloadable sections that are still fixed at start: the access logger is bound
# to each connection when it opens, and a watcher that was off never sees the file again.
RESTART_ONLY_FIELDS = (("logging", "access_log"), ("reload", "enabled"))


def restart_key(config: ProxyConfig) -> dict[str, Any]:
    """The part of `config` a running proxy cannot apply without a restart."""
    data = config.model_dump(mode="json")
    if not config.reload.enabled:
        return data  # nothing watches the file: every change needs new processes
    key = {name: value for name, value in data.items() if name not in RELOADABLE_SECTIONS}
    for section, field in RESTART_ONLY_FIELDS:
        key[f"{section}.{field}"] = data[section][field]
    return key


def parse_config(text: str) -> ProxyConfig:
    """Parse the YAML text of a config file; raises pydantic.ValidationError or ValueError."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        # The parser's own text quotes the offending lines, which may hold a password.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ValueError(f"not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ValueError("the proxy config file must hold a YAML mapping at the top level")
    return ProxyConfig.model_validate(data)


def load_config(path: Path) -> ProxyConfig:
    return parse_config(path.read_text(encoding="utf-8"))


def config_problems(exc: Exception) -> list[str]:
    """What is wrong with a config file, as `field: message` lines, never with the values: a
    backend or Redis URL may hold a password, and this text goes to logs."""
    if isinstance(exc, ValidationError):
        return [f"{'.'.join(str(part) for part in err['loc']) or '(top level)'}: {err['msg']}"
                for err in exc.errors(include_input=False, include_url=False)]
    return [str(exc)]


def describe_config_error(path: Path, exc: Exception) -> str:
    """The CLI's message for a config file that cannot be used."""
    if isinstance(exc, ValidationError):
        lines = [f"invalid config file {path}:"]
        lines.extend(f"  {problem}" for problem in config_problems(exc))
        lines.append("fix these fields and start again")
        return "\n".join(lines)
    return f"cannot read config file {path}: {exc}"
