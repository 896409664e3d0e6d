"""`spec.proxy`: the aiohttp data plane's workload, backends, auth and rate limits."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, HttpUrl, WithJsonSchema

from gpuproxy_operator.api.base import (
    FreeForm,
    Model,
    Name,
    Resources,
    SecretKeyRef,
    Toleration,
)
from gpuproxy_operator.api.rules import CrossFieldRule

# The proxy's own config types: the operator can only offer what the proxy understands.
from gpuproxy_proxy.config import RedisFailureMode, SpoolFullPolicy, Strategy

# A stopping pod's time after its drain delay and in-flight requests: stop accepting, flush
# usage records and exit. Above the supervisor's own 15 s backstop for a stuck worker, so the
# supervisor (which logs it), not the kubelet's SIGKILL, ends one.
SHUTDOWN_MARGIN_SECONDS = 20


# http(s), a host, no `user:pass@` (it would end up in the Host header, and secrets do not
# belong in a CR): the CRD carries the same pattern, so the API server refuses what we do.
BACKEND_URL_PATTERN = r"^https?://[^\s/?#@]+([/?#]\S*)?$"


def _check_backend_url(value: Any) -> Any:
    if isinstance(value, str) and not re.match(BACKEND_URL_PATTERN, value):
        raise ValueError("must be an http:// or https:// URL with a host and no credentials, "
                         "e.g. http://vllm-0.gpu.svc:8000")
    return value


BackendUrl = Annotated[
    HttpUrl,
    BeforeValidator(_check_backend_url),
    Field(json_schema_extra={"pattern": BACKEND_URL_PATTERN}),
]


class Backend(Model):
    """One GPU inference backend (an OpenAI-compatible HTTP server)."""

    name: Name
    """Unique name, used in metrics and usage records."""
    url: BackendUrl
    """Base URL, e.g. http://vllm-0.gpu.svc:8000."""
    weight: Annotated[int, Field(ge=1, le=1000)] = 1
    """Relative share of traffic with loadBalancing.strategy weighted_round_robin."""
    health_path: Annotated[str, Field(pattern=r"^/")] = "/health"
    """Path probed by the proxy's active health checks."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Free-form labels (e.g. gpu: a100), reported in /stats."""


# A Service port's name or an EndpointSlice port number, as Kubernetes writes `targetPort`.
DiscoveryPort = Annotated[int | str, WithJsonSchema({"x-kubernetes-int-or-string": True})]


class BackendDiscovery(Model):
    """Backends found at run time: the ready endpoints of a Service (or of EndpointSlices
    matching labels) in the cluster's namespace, watched by the proxy itself."""

    name: Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=30)]
    """Prefix of the discovered backends' names (<name>-<ip>-<port>), in metrics and usage."""
    service: Name | None = None
    """A Service in the cluster's namespace: its EndpointSlices."""
    selector: dict[str, str] | None = None
    """Or: labels of the EndpointSlices (matchLabels)."""
    port: DiscoveryPort
    """The EndpointSlice port's name (the Service port's, e.g. http) or number. The proxy's
    NetworkPolicy admits egress to it; a name there means the pods' container port name, so
    name the Service port like the container port (or give the number)."""
    scheme: Literal["http", "https"] = "http"
    """Scheme of the discovered backends' URLs."""
    health_path: Annotated[str, Field(pattern=r"^/")] = "/health"
    """Path probed by the proxy's active health checks."""

    cross_field_rules = (
        CrossFieldRule(
            check=lambda v: (v["service"] is None) != (v["selector"] is None),
            message="backendDiscovery: service or selector, not both",
            cel="has(self.service) != has(self.selector)",
        ),
    )

    def label_selector(self) -> str | None:
        if self.selector is None:
            return None
        return ",".join(f"{k}={v}" for k, v in sorted(self.selector.items()))


class LoadBalancing(Model):
    """How each request picks a healthy backend."""

    strategy: Strategy = "least_connections"
    """round_robin, weighted_round_robin (by backend weight), least_connections (fewest in
    flight), least_response_time (latency EWMA), equal_weighted (uniform random), least_load
    (the engines' queue, running batch and KV-cache use from their /metrics),
    prefix_affinity (a shared prompt prefix goes to the backend caching it, within a load
    cap) or session_affinity (by the x-session-id header or the OpenAI user field)."""
    per_model: Annotated[dict[str, Strategy], Field(max_length=256)] = Field(
        default_factory=dict)
    """A strategy per requested model or LoRA adapter (the body's model), overriding
    strategy for it."""


class HealthCheck(Model):
    """Active and passive backend health checking."""

    interval_seconds: Annotated[int, Field(ge=1, le=300)] = 5
    """Seconds between active probes of each backend."""
    timeout_seconds: Annotated[int, Field(ge=1, le=60)] = 2
    """Probe timeout; must be below intervalSeconds."""
    unhealthy_threshold: Annotated[int, Field(ge=1, le=100)] = 3
    """Consecutive failures (probes or requests) that eject a backend."""
    ejection_seconds: Annotated[int, Field(ge=1, le=3600)] = 30
    """How long an ejected backend waits before a half-open retry."""

    cross_field_rules = (
        CrossFieldRule(
            check=lambda v: v["timeout_seconds"] < v["interval_seconds"],
            message="timeoutSeconds must be less than intervalSeconds",
            cel="self.timeoutSeconds < self.intervalSeconds",
            reads=("timeoutSeconds", "intervalSeconds"),
            field_path=".timeoutSeconds",
        ),
    )


class UpstreamRetry(Model):
    """Retrying a request a backend refused (429/503, or a refused connection) on another
    backend, before any byte reached the client."""

    max_attempts: Annotated[int, Field(ge=0, le=10)] = 2
    """Extra attempts after the first, each on a backend not tried yet; 0 turns retries of
    429/503 off."""
    budget_percent: Annotated[int, Field(ge=0, le=100)] = 20
    """Retries stay under this share of the requests of the last 10 s (plus
    minRetriesPerSecond), so they never amplify an overload."""
    min_retries_per_second: Annotated[int, Field(ge=0, le=100000)] = 10
    """Retries always allowed per worker and second, whatever the share."""
    max_penalty_seconds: Annotated[int, Field(ge=0, le=3600)] = 30
    """A backend's Retry-After keeps it out of the picks that long, at most this (0 = off)."""


class Upstream(Model):
    """Timeouts and pooling toward the backends."""

    connect_timeout_seconds: Annotated[int, Field(ge=1, le=120)] = 5
    """Connect timeout; exceeded -> 504 (or one retry on another backend)."""
    read_timeout_seconds: Annotated[int, Field(ge=1, le=3600)] = 300
    """Longest silence between bytes from a backend; long enough for slow generations."""
    max_connections_per_backend: Annotated[int, Field(ge=1, le=100000)] = 1024
    """Pooled keep-alive connections per backend and worker."""
    max_request_seconds: Annotated[int, Field(ge=1, le=3600)] = 600
    """Longest a request, a stream included, may take end to end. A stopping pod waits this
    long for its in-flight requests, so it sizes the termination grace period."""
    retry: UpstreamRetry = Field(default_factory=UpstreamRetry)
    """Retries of refused requests on another backend, within a budget."""


class PriorityClass(Model):
    """One admission priority class."""

    weight: Annotated[int, Field(ge=1, le=1000)] = 1
    """Share of the admission queue relative to the other classes' weights."""
    users: Annotated[list[str], Field(max_length=1000)] = Field(default_factory=list)
    """User ids allowed to ask for this class (header x-gpuproxy-priority)."""
    teams: Annotated[list[str], Field(max_length=1000)] = Field(default_factory=list)
    """Teams allowed to ask for this class."""
    api_keys: Annotated[list[str], Field(max_length=1000)] = Field(default_factory=list)
    """API key ids allowed to ask for this class."""


class Admission(Model):
    """Flow control: while every backend is saturated, requests wait in the proxy (fair across
    tenants) instead of piling onto the GPUs, and are shed with Retry-After past a deadline."""

    enabled: bool = False
    """Queue requests while every backend is saturated."""
    max_in_flight_per_backend: Annotated[int, Field(ge=1, le=100000)] = 64
    """Requests one backend takes from one proxy pod before it counts as saturated (about its
    batch size divided by the proxy replicas)."""
    max_kv_cache_usage_percent: Annotated[int, Field(ge=1, le=100)] = 80
    """A backend whose scraped KV-cache use is above this (fresh engine signals) is saturated
    too; 100 turns the test off."""
    max_engine_queue: Annotated[int, Field(ge=0, le=100000)] = 5
    """A backend with more requests waiting in the engine than this (fresh engine signals) is
    saturated too; 100000 turns the test off in practice."""
    max_queue: Annotated[int, Field(ge=0, le=1_000_000)] = 1000
    """Waiting requests per worker; more are refused at once with 503."""
    queue_timeout_seconds: Annotated[int, Field(ge=1, le=3600)] = 30
    """Longest wait in the queue; then 429 (the tenant used more than its share) or 503."""
    retry_after_seconds: Annotated[int, Field(ge=1, le=3600)] = 2
    """Retry-After of the queue's refusals."""
    priorities: Annotated[dict[str, PriorityClass], Field(max_length=64)] = Field(
        default_factory=dict)
    """Priority classes by name; a request asks with x-gpuproxy-priority, honored only for the
    principals the class lists. A class "default" (weight 1) exists unless set here."""
    default_priority: Annotated[str, Field(min_length=1, max_length=63)] = "default"
    """The class of every request not granted another."""

    cross_field_rules = (
        CrossFieldRule(
            check=lambda v: v["default_priority"] == "default"
            or v["default_priority"] in v["priorities"],
            message="defaultPriority must be \"default\" or one of priorities",
            cel="self.defaultPriority == 'default' || self.defaultPriority in self.priorities",
            reads=("defaultPriority", "priorities"),
            field_path=".defaultPriority",
        ),
    )


class ClientTimeouts(Model):
    """Deadlines on clients, so none holds a connection, an in-flight slot or a backend
    connection by being slow (a request head has a fixed 10 s)."""

    body_seconds: Annotated[int, Field(ge=1, le=3600)] = 60
    """Longest a request body may take to arrive, whatever its rate; past it -> 408. The
    slowest upload accepted averages maxBodyBytes / bodySeconds: raise it for large bodies
    from clients on slow links."""
    body_min_bytes_per_second: Annotated[int, Field(ge=0, le=100_000_000)] = 1024
    """Slowest average rate of a request body, counted after its first 10 s; slower -> 408
    long before bodySeconds (a stalled upload frees its slot early). 0: no rate check."""
    write_seconds: Annotated[int, Field(ge=1, le=3600)] = 30
    """Longest a client may leave its answer unread (its buffer full, a stream included);
    then its connection and the backend's are cut and the generation stops."""


class Shutdown(Model):
    """How a stopping proxy pod hands its clients over (SIGTERM until exit)."""

    drain_delay_seconds: Annotated[int, Field(ge=0, le=300)] = 10
    """After SIGTERM the proxy keeps serving (with Connection: close) while /ready fails, so
    endpoints and load balancers stop sending new connections before its listener closes."""
    idle_close_seconds: Annotated[int, Field(ge=0, le=300)] = 10
    """Then idle keep-alive connections are closed, spread over this long so their clients
    do not all reconnect to the other pods at once."""


class Auth(Model):
    """Client authentication: API keys (stored hashed in PostgreSQL) and HS256 JWTs."""

    enabled: bool = True
    """Require credentials on inference routes."""
    jwt_secret_ref: SecretKeyRef | None = None
    """Secret key holding the HS256 signing secret; JWTs are rejected when unset."""
    admin_token_secret_ref: SecretKeyRef | None = None
    """Secret key holding the admin token (at least 32 characters, e.g. `openssl rand -hex
    32`) of the admin API (/admin/keys on adminApiPort); the admin API is off when unset."""
    jwt_issuer: str | None = None
    """Required `iss` claim."""
    jwt_audience: str | None = None
    """Required `aud` claim."""
    api_key_cache_seconds: Annotated[int, Field(ge=0, le=3600)] = 30
    """How long a looked-up API key is used by each proxy process without asking the
    database again. Revocations are pushed through Redis (under a second); this bounds one
    that a process missed while Redis was unreachable."""
    api_key_cache_max_stale_seconds: Annotated[int, Field(ge=0, le=86400)] = 300
    """No cached API key is served longer than this after it was read from the database,
    not even while the database is down (then 503): the revocation bound during an outage."""

    cross_field_rules = (
        CrossFieldRule(
            check=lambda v: (not (v["jwt_issuer"] or v["jwt_audience"])
                             or v["jwt_secret_ref"] is not None),
            message="jwtIssuer and jwtAudience need jwtSecretRef (the HS256 secret)",
            cel="!(has(self.jwtIssuer) || has(self.jwtAudience)) || has(self.jwtSecretRef)",
            field_path=".jwtSecretRef",
        ),
    )


TokenCount = Annotated[int, Field(ge=0, le=10**15)]


class TokenLimits(Model):
    """Tokens (prompt + completion) per window; unset or 0: no limit for that scope."""

    per_api_key: TokenCount | None = None
    """Tokens per window per API key."""
    per_user: TokenCount | None = None
    """Tokens per window per user (API keys' users and JWT subjects)."""
    per_team: TokenCount | None = None
    """Tokens per window per team (the team an API key was created with)."""


class RateLimits(Model):
    """Per-minute request limits and token limits, shared by all replicas through Redis."""

    enabled: bool = True
    """Enforce the limits."""
    per_ip: Annotated[int, Field(ge=1)] = 1000
    """Requests per window per client IP."""
    per_user: Annotated[int, Field(ge=1)] = 10000
    """Requests per window per authenticated user."""
    per_api_key: Annotated[int, Field(ge=1)] = 100000
    """Requests per window per API key."""
    window_seconds: Annotated[int, Field(ge=1, le=3600)] = 60
    """Window length."""
    on_redis_failure: RedisFailureMode = "local"
    """While Redis is unreachable: an in-process limiter (local), allow all (open) or reject
    with 503 (closed)."""
    trusted_proxies: list[str] = Field(default_factory=list)
    """CIDRs of load balancers whose X-Forwarded-For is trusted for the client IP."""
    tokens_per_minute: TokenLimits = Field(default_factory=TokenLimits)
    """Token limits per fixed minute: a request reserves its prompt estimate plus max_tokens
    and is settled with its real usage. Off by default."""
    tokens_per_day: TokenLimits = Field(default_factory=TokenLimits)
    """Token limits per UTC day. Off by default."""
    default_max_tokens: Annotated[int, Field(ge=1, le=10_000_000)] = 1024
    """What a request without max_tokens reserves for its completion."""


# USD per one million tokens, as a decimal string ("0.15"): no float rounding in the CR.
Price = Annotated[str, Field(pattern=r"^[0-9]{1,7}(\.[0-9]{1,6})?$", max_length=14)]


class ModelPrice(Model):
    """Price of one model in USD per one million tokens."""

    input: Price = "0"
    """Prompt tokens."""
    output: Price = "0"
    """Completion tokens."""


class Budgets(Model):
    """Budgets per API key, user and team in tokens or USD, set through the admin API
    (PUT /admin/budgets/{scope}/{id}); this section turns them on and prices the models (the
    prices also apply with budgets off: GET /admin/spend and gpuproxy_spend_usd_total)."""

    enabled: bool = False
    """Check budgets (needs Redis; they are stored in PostgreSQL too)."""
    prices: Annotated[dict[str, ModelPrice], Field(max_length=1024)] = Field(
        default_factory=dict)
    """Model name (the request's `model`) -> price."""
    default_price: ModelPrice = Field(default_factory=ModelPrice)
    """Price of a model not in `prices`."""
    stream_extend_tokens: Annotated[int, Field(ge=1, le=1_000_000)] = 64
    """A stream past its reservation reserves this many more tokens at a time; refused: the
    stream ends with an SSE error event."""
    reservation_ttl_seconds: Annotated[int, Field(ge=60, le=86400)] = 900
    """A reservation never settled (its pod died) is released after this long (at least
    upstream.maxRequestSeconds + 60 s)."""


class Metering(Model):
    """Usage records: the pod-local spool that keeps them through crashes and database
    outages, and how long PostgreSQL keeps them."""

    spool_size_mib: Annotated[int, Field(ge=16, le=1_048_576)] = 256
    """Disk per pod for records not yet in PostgreSQL (an emptyDir that survives container
    restarts, not pod deletion), split evenly between the workers: about 1 KiB per request,
    so 256 MiB carries roughly 250k requests of a database outage. The emptyDir's sizeLimit
    is twice this plus 64 MiB (a crashed process's spool waits there for its replay)."""
    on_spool_full: SpoolFullPolicy = "reject"
    """When the spool is full: refuse new requests with 503 (reject: nothing goes unbilled),
    or delete the oldest spooled records (drop_oldest: serve on, counted in
    gpuproxy_metering_spool_full_total)."""
    retention_days: Annotated[int, Field(ge=1, le=3650)] = 90
    """Days of usage records kept; older daily partitions are dropped."""


class ProxyTls(Model):
    """HTTPS on the client port, terminated by the proxy (the admin port stays plain HTTP)."""

    secret_name: Name
    """Secret of type kubernetes.io/tls in the cluster's namespace (keys tls.crt and tls.key;
    ca.crt is not used), e.g. the secretName of a cert-manager Certificate. Mounted as files:
    a renewed certificate reaches new connections within about a minute (the kubelet's sync)
    without a restart and without closing open connections."""
    min_version: Literal["1.2", "1.3"] = "1.2"
    """Oldest TLS version accepted; TLS 1.2 uses ECDHE key exchange and AEAD ciphers only."""


class ServiceSpec(Model):
    """The Service clients connect to."""

    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    """Service type."""
    annotations: dict[str, str] = Field(default_factory=dict)
    """Annotations, e.g. for a cloud load balancer."""
    external_traffic_policy: Literal["Cluster", "Local"] | None = None
    """Local keeps client source IPs (NodePort/LoadBalancer only)."""
    load_balancer_source_ranges: list[str] = Field(default_factory=list)
    """CIDRs allowed through a LoadBalancer."""
    port: Annotated[int, Field(ge=1, le=65535)] = 80
    """Service port mapped to the proxy's client port."""


class PodDisruptionBudgetSpec(Model):
    """Voluntary-disruption budget of the proxy pods."""

    enabled: bool = True
    """Create the PodDisruptionBudget."""
    max_unavailable: Annotated[int, Field(ge=1)] = 1
    """Proxy pods that may be down at once during drains."""


# An IPv4 or IPv6 CIDR as a NetworkPolicy ipBlock takes it.
CIDR_PATTERN = r"^[0-9A-Fa-f:.]+/[0-9]{1,3}$"
Cidr = Annotated[str, Field(pattern=CIDR_PATTERN, max_length=64)]
# What kube-prometheus-stack's and the prometheus-operator's Prometheus pods carry.
PROMETHEUS_POD_LABELS = {"app.kubernetes.io/name": "prometheus"}


class NetworkPeer(Model):
    """Pods allowed in, as in a NetworkPolicy peer: a namespace selector (matchLabels; {} is
    every namespace) and/or a pod selector (matchLabels); one of them at least."""

    namespace_selector: dict[str, str] | None = None
    """Labels of the namespaces, e.g. {kubernetes.io/metadata.name: monitoring}; {} is every
    namespace; unset: the cluster's own namespace."""
    pod_selector: dict[str, str] | None = None
    """Labels of the pods; unset: every pod of the selected namespaces."""

    cross_field_rules = (
        CrossFieldRule(
            check=lambda v: v["namespace_selector"] is not None or v["pod_selector"] is not None,
            message="a peer needs namespaceSelector or podSelector",
            cel="has(self.namespaceSelector) || has(self.podSelector)",
        ),
    )


def _prometheus_peers() -> list[NetworkPeer]:
    return [NetworkPeer(namespace_selector={}, pod_selector=dict(PROMETHEUS_POD_LABELS))]


class ProxyNetworkPolicy(Model):
    """The proxy pods' NetworkPolicy: who may connect to them, and where they may connect."""

    enabled: bool = True
    """Create it. Ingress: the client port from clientCidrs / clientNamespaces (both empty:
    from anywhere), the admin port only from the operator's pods and metricsFrom. Egress: DNS,
    the backends (an IP literal by address and port, a DNS name by port), PgBouncer and
    Redis."""
    client_cidrs: Annotated[list[Cidr], Field(max_length=64)] = Field(default_factory=list)
    """Client source ranges (ipBlock), e.g. your load balancers' or nodes' ranges (a
    LoadBalancer with externalTrafficPolicy Cluster shows node addresses)."""
    client_namespaces: Annotated[list[Name], Field(max_length=64)] = Field(default_factory=list)
    """Namespaces whose pods may be clients."""
    metrics_from: Annotated[list[NetworkPeer], Field(max_length=16)] = Field(
        default_factory=_prometheus_peers)
    """Who may scrape the admin port (/metrics) besides the operator; default: pods labelled
    app.kubernetes.io/name=prometheus in any namespace."""


class ProxySpec(Model):
    """The proxy Deployment: the front door for client connections."""

    image: str | None = None
    """Container image of gpuproxy-proxy. Unset: the operator's default (the chart's
    `images.proxy`), so an operator upgrade also upgrades the proxy."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    """Image pull policy."""
    image_pull_secrets: list[Name] = Field(default_factory=list)
    """Secrets for pulling images from a private registry."""
    replicas: Annotated[int, Field(ge=0, le=1000)] = 3
    """Replicas when autoscaling is off (the scale subresource sets this)."""
    workers: Annotated[int, Field(ge=1, le=256)] = 4
    """Worker processes per pod sharing the port (SO_REUSEPORT); about one per core."""
    port: Annotated[int, Field(ge=1024, le=65535)] = 8080
    """Client port in the container."""
    admin_port: Annotated[int, Field(ge=1024, le=65535)] = 9090
    """Port of /health, /ready, /stats and /metrics in the container."""
    admin_api_port: Annotated[int, Field(ge=1024, le=65535)] = 9091
    """Port of the admin API (/admin/keys, /admin/budgets, /admin/spend) in the container, open
    only with auth.adminTokenSecretRef; the NetworkPolicy admits only the operator's pods (reach
    it with `kubectl port-forward`)."""
    connections_per_replica: Annotated[int, Field(ge=1, le=10_000_000)] = 100_000
    """Concurrent client connections one replica is sized for (the autoscaling unit)."""
    max_body_bytes: Annotated[int, Field(ge=1024)] = 10 * 1024 * 1024
    """Largest request body accepted; larger gets 413."""
    termination_grace_period_seconds: Annotated[int, Field(ge=1, le=7200)] | None = None
    """Override of the pods' termination grace period. Unset: shutdown.drainDelaySeconds +
    the longer of upstream.maxRequestSeconds and shutdown.idleCloseSeconds + 20 s, so a drain
    never cuts a request short. At least drainDelaySeconds + 20."""
    shutdown: Shutdown = Field(default_factory=Shutdown)
    """Graceful shutdown: drain delay and spreading of idle-connection closes."""
    client_timeouts: ClientTimeouts = Field(default_factory=ClientTimeouts)
    """Deadlines on slow clients: request bodies (408) and unread answers (cut)."""
    resources: Resources | None = None
    """Container resources. Unset: derived from workers and connectionsPerReplica: 750m CPU
    requested and 1 CPU limit per (single-threaded) worker; memory from the measured idle
    process and per-connection figures (about 10x more per connection with tls) plus 20%,
    limit 1.5x (`gpuproxy-operator plan`)."""
    backends: Annotated[list[Backend], Field(max_length=256)] = Field(default_factory=list)
    """GPU backends by URL; names must be unique. Empty only with backendDiscovery."""
    backend_discovery: Annotated[list[BackendDiscovery], Field(max_length=16)] = Field(
        default_factory=list)
    """More backends from Services or EndpointSlice labels, followed within 5 s by the proxy
    (its ServiceAccount gets list/watch on endpointslices in this namespace)."""
    load_balancing: LoadBalancing = Field(default_factory=LoadBalancing)
    """Backend selection."""
    health_check: HealthCheck = Field(default_factory=HealthCheck)
    """Backend health checking."""
    upstream: Upstream = Field(default_factory=Upstream)
    admission: Admission = Field(default_factory=Admission)
    """Admission queue and flow control in front of saturated backends."""
    """Upstream timeouts and pooling."""
    auth: Auth = Field(default_factory=Auth)
    """Client authentication."""
    rate_limits: RateLimits = Field(default_factory=RateLimits)
    """Rate limits (guide: 1000 / 10000 / 100000 per minute) and token limits."""
    metering: Metering = Field(default_factory=Metering)
    """Usage metering: crash spool and retention."""
    tls: ProxyTls | None = None
    """HTTPS on the client port. Unset: plain HTTP, which allowPlainHttp must acknowledge."""
    allow_plain_http: bool | None = None
    """Serve plain HTTP on the client port (no tls): true when TLS ends before the proxy (an
    ingress, a mesh sidecar, a load balancer). false refuses a spec without tls. Unset without
    tls: plain HTTP, as before tls existed, with the ClientTls condition False
    (PlainHttpNotAcknowledged) until tls or allowPlainHttp is set."""
    budgets: Budgets = Field(default_factory=Budgets)
    """Token or USD budgets per API key, user and team, and the price table."""
    service: ServiceSpec = Field(default_factory=ServiceSpec)
    """Client-facing Service."""
    pod_disruption_budget: PodDisruptionBudgetSpec = Field(default_factory=PodDisruptionBudgetSpec)
    """PodDisruptionBudget."""
    network_policy: ProxyNetworkPolicy = Field(default_factory=ProxyNetworkPolicy)
    """The proxy pods' NetworkPolicy."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Node labels the proxy pods must run on."""
    tolerations: list[Toleration] = Field(default_factory=list)
    """Tolerations of the proxy pods."""
    affinity: FreeForm | None = None
    """Pod affinity/anti-affinity, as in a Pod spec."""
    topology_spread_constraints: list[FreeForm] = Field(default_factory=list)
    """Topology spread constraints, as in a Pod spec; default spreads over nodes and zones."""
    priority_class_name: str | None = None
    """PriorityClass of the proxy pods."""
    pod_annotations: dict[str, str] = Field(default_factory=dict)
    """Extra pod annotations."""

    cross_field_rules = (
        CrossFieldRule(
            check=lambda v: bool(v["backends"]) or bool(v["backend_discovery"]),
            message="at least one backend: backends or backendDiscovery",
            cel="size(self.backends) > 0 || size(self.backendDiscovery) > 0",
            reads=("backends", "backendDiscovery"),
            field_path=".backends",
        ),
        CrossFieldRule(
            # The API server enforces this through the list-map key `name` (Duplicate value).
            check=lambda v: len({b.name for b in v["backends"]}) == len(v["backends"]),
            message="backends: names must be unique",
            detail=lambda v: "repeated: " + ", ".join(sorted(
                {b.name for b in v["backends"] if [c.name for c in v["backends"]].count(b.name) > 1}
            )),
        ),
        CrossFieldRule(
            check=lambda v: (v["load_balancing"].strategy == "weighted_round_robin"
                             or all(b.weight == 1 for b in v["backends"])),
            message="backends[].weight other than 1 only takes effect with "
            "loadBalancing.strategy weighted_round_robin",
            cel="self.loadBalancing.strategy == 'weighted_round_robin'"
            " || self.backends.all(b, !has(b.weight) || b.weight == 1)",
            reads=("loadBalancing.strategy", "backends"),
            field_path=".backends",
        ),
        CrossFieldRule(
            check=lambda v: (v["termination_grace_period_seconds"] is None
                             or v["termination_grace_period_seconds"]
                             >= v["shutdown"].drain_delay_seconds + SHUTDOWN_MARGIN_SECONDS),
            message=f"terminationGracePeriodSeconds must be at least "
            f"shutdown.drainDelaySeconds + {SHUTDOWN_MARGIN_SECONDS} (the drain delay, then "
            f"{SHUTDOWN_MARGIN_SECONDS} s to stop accepting, flush usage records and exit); "
            "leave it unset to derive it from upstream.maxRequestSeconds",
            cel="!has(self.terminationGracePeriodSeconds) || self.terminationGracePeriodSeconds"
            f" >= self.shutdown.drainDelaySeconds + {SHUTDOWN_MARGIN_SECONDS}",
            reads=("shutdown.drainDelaySeconds",),
            field_path=".terminationGracePeriodSeconds",
        ),
        CrossFieldRule(
            check=lambda v: v["allow_plain_http"] is not False or v["tls"] is not None,
            message="allowPlainHttp is false, so tls is required: set tls.secretName to a "
            "kubernetes.io/tls Secret (e.g. from cert-manager), or allowPlainHttp to true",
            cel="self.allowPlainHttp || has(self.tls)",
            reads=("allowPlainHttp",),
            field_path=".tls",
        ),
        CrossFieldRule(
            check=lambda v: not (v["allow_plain_http"] is True and v["tls"] is not None),
            message="allowPlainHttp true and tls together: with tls the client port serves "
            "HTTPS only; remove allowPlainHttp",
            cel="!self.allowPlainHttp",
            reads=("allowPlainHttp", "tls"),
            field_path=".allowPlainHttp",
        ),
        CrossFieldRule(
            check=lambda v: v["port"] != v["admin_port"],
            message="port and adminPort must differ",
            cel="self.port != self.adminPort",
            reads=("port", "adminPort"),
            field_path=".adminPort",
        ),
        CrossFieldRule(
            # Only while the port is used: a cluster without an admin token keeps any adminPort.
            check=lambda v: (v["auth"].admin_token_secret_ref is None
                             or v["admin_api_port"] not in (v["port"], v["admin_port"])),
            message="adminApiPort must differ from port and adminPort (with "
            "auth.adminTokenSecretRef set, the admin API listens on it)",
            cel="!has(self.auth.adminTokenSecretRef) || (self.adminApiPort != self.port"
            " && self.adminApiPort != self.adminPort)",
            reads=("auth", "port", "adminPort", "adminApiPort"),
            field_path=".adminApiPort",
        ),
    )
