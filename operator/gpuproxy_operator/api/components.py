"""The supporting components of a GpuProxyCluster: autoscaling, database, PgBouncer, Redis,
node tuning and monitoring. Defaults are the production deployment guide's numbers."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from gpuproxy_operator.api.base import Model, Name, Resources, SecretKeyRef, Toleration
from gpuproxy_operator.api.rules import CrossFieldRule
from gpuproxy_proxy.config import SslMode


class ScalingPolicy(Model):
    """At most `value` pods (type Pods) or percent of current replicas (type Percent) per period."""

    type: Literal["Pods", "Percent"]
    """Pods or Percent."""
    value: Annotated[int, Field(ge=1)]
    """Amount of change allowed per period."""
    period_seconds: Annotated[int, Field(ge=1, le=1800)]
    """Length of the period the change is counted over."""


class ScalingRules(Model):
    """Rate limits on one scaling direction, as in the HorizontalPodAutoscaler."""

    stabilization_window_seconds: Annotated[int, Field(ge=0, le=3600)]
    """Recommendations of this past window are considered; the most conservative wins."""
    select_policy: Literal["Max", "Min", "Disabled"] = "Max"
    """Which policy wins when several apply; Disabled turns this direction off."""
    policies: Annotated[list[ScalingPolicy], Field(max_length=10)]
    """Allowed rate of change."""

    cross_field_rules = (
        CrossFieldRule(
            check=lambda v: v["select_policy"] == "Disabled" or len(v["policies"]) > 0,
            message="policies must not be empty unless selectPolicy is Disabled",
            cel="self.selectPolicy == 'Disabled' || size(self.policies) > 0",
            reads=("selectPolicy", "policies"),
            field_path=".policies",
        ),
    )


def _default_scale_up() -> ScalingRules:
    return ScalingRules(
        stabilization_window_seconds=0,
        select_policy="Max",
        policies=[
            ScalingPolicy(type="Percent", value=100, period_seconds=15),
            ScalingPolicy(type="Pods", value=4, period_seconds=15),
        ],
    )


def _default_scale_down() -> ScalingRules:
    # Gentle: every removed pod drops up to connectionsPerReplica clients at once.
    return ScalingRules(
        stabilization_window_seconds=300,
        select_policy="Max",
        policies=[
            ScalingPolicy(type="Pods", value=1, period_seconds=60),
            ScalingPolicy(type="Percent", value=10, period_seconds=60),
        ],
    )


class ScalingBehavior(Model):
    """Scale-up and scale-down behaviour (HPA-style; scale-down gentler than the HPA's)."""

    scale_up: ScalingRules = Field(default_factory=_default_scale_up)
    """Scale-up rules (default: no window, +100% or +4 pods per 15 s, whichever is more)."""
    scale_down: ScalingRules = Field(default_factory=_default_scale_down)
    """Scale-down rules (default: 300 s window, then at most 1 pod or 10%, whichever is more,
    per 60 s); they also pace lowered bounds and spec.proxy.replicas scale-downs."""


class AutoscalingSpec(Model):
    """Connection-based autoscaling of the proxy replicas by the operator."""

    enabled: bool = False
    """Let the operator own proxy replicas, from live connection counts."""
    min_replicas: Annotated[int, Field(ge=1, le=1000)] = 2
    """Lower bound."""
    max_replicas: Annotated[int, Field(ge=1, le=1000)] = 13
    """Upper bound: the guide's 1M connections at 100k per replica with 20% headroom."""
    target_connections: Annotated[int, Field(ge=1)] = 1_000_000
    """Total connections the platform is sized for; replicas are not scaled beyond what it needs."""
    headroom_percent: Annotated[int, Field(ge=0, le=90)] = 20
    """Spare capacity kept per replica: target utilisation is 100 - headroomPercent."""
    tolerance_percent: Annotated[int, Field(ge=0, le=50)] = 10
    """No change while the usage ratio is within this band around 1.0."""
    interval_seconds: Annotated[int, Field(ge=5, le=600)] = 15
    """How often connection counts are read."""
    behavior: ScalingBehavior = Field(default_factory=ScalingBehavior)
    """Rate policies and stabilization windows."""

    cross_field_rules = (
        CrossFieldRule(
            check=lambda v: v["min_replicas"] <= v["max_replicas"],
            message="minReplicas must be less than or equal to maxReplicas",
            cel="self.minReplicas <= self.maxReplicas",
            reads=("minReplicas", "maxReplicas"),
            field_path=".minReplicas",
        ),
    )


# Five cron fields (minute hour day month weekday), or a macro such as @daily; the CronJob
# controller parses the rest. Bounded so the CRD's CEL cost estimate stays small.
CRON_SCHEDULE = r"^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|(\S+\s+){4}\S+)$"


class DatabaseBackupSpec(Model):
    """A daily `pg_dump` of the database (API keys and usage records) onto a volume the user
    provides, old dumps deleted after retentionDays, as the deployment guide's backup does."""

    enabled: bool = False
    """Run the backup CronJob (needs claimName)."""
    schedule: Annotated[str, Field(min_length=1, max_length=100, pattern=CRON_SCHEDULE)] = (
        "0 2 * * *")
    """Cron schedule (the guide's 02:00 daily)."""
    time_zone: Annotated[str, Field(min_length=1, max_length=64,
                                    pattern=r"^[A-Za-z0-9_+/-]+$")] | None = None
    """IANA time zone of the schedule (e.g. Europe/Berlin); unset: the controller's (UTC)."""
    retention_days: Annotated[int, Field(ge=1, le=3650)] = 30
    """Dumps older than this many days are deleted after each successful backup."""
    claim_name: Name | None = None
    """An existing PersistentVolumeClaim in the cluster's namespace that holds the dumps. The
    operator never creates or deletes it, so backups outlive the GpuProxyCluster."""
    image: str | None = None
    """Image with pg_dump (a PostgreSQL client at least as new as the server). Unset: the
    operator's default (the chart's `images.backup`)."""
    resources: Resources = Field(default_factory=lambda: Resources(
        requests={"cpu": "100m", "memory": "128Mi"}, limits={"memory": "512Mi"}))
    """Compute resources of the backup container."""

    cross_field_rules = (
        CrossFieldRule(
            check=lambda v: not v["enabled"] or v["claim_name"] is not None,
            message="enabled backups need claimName: the PersistentVolumeClaim the dumps are "
                    "written to",
            cel="!self.enabled || has(self.claimName)",
            reads=("enabled",),
            field_path=".claimName",
        ),
    )


class DatabaseSpec(Model):
    """The user's PostgreSQL (usage records and API keys), reached through PgBouncer."""

    host: Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9_.:-]+$")]
    """Host name or IP address of the PostgreSQL server."""
    port: Annotated[int, Field(ge=1, le=65535)] = 5432
    """PostgreSQL port."""
    database: Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9_.-]+$")] = (
        "gpuproxy"
    )
    """Database name."""
    credentials_secret: Name
    """Secret with keys `username` and `password` of the login role."""
    ssl_mode: SslMode = "prefer"
    """TLS mode from PgBouncer to PostgreSQL."""
    backup: DatabaseBackupSpec = Field(default_factory=DatabaseBackupSpec)
    """Scheduled pg_dump backups of the database (off unless enabled)."""


class PgBouncerSpec(Model):
    """PgBouncer in transaction pooling mode in front of the database."""

    image: str | None = None
    """Container image providing the pgbouncer binary. Unset: the operator's default (the
    chart's `images.pgbouncer`), so an operator upgrade also upgrades PgBouncer."""
    replicas: Annotated[int, Field(ge=1, le=100)] = 2
    """PgBouncer pods (two by default, so a restart or node drain never cuts off API-key
    lookups and metering). Each opens up to maxDbConnections to PostgreSQL: keep replicas x
    maxDbConnections within max_connections minus its reserved slots (`plan` checks)."""
    pool_mode: Literal["session", "transaction", "statement"] = "transaction"
    """Pooling mode; transaction is what 100k clients need."""
    max_client_conn: Annotated[int, Field(ge=1)] = 100_000
    """Client connections one PgBouncer accepts."""
    default_pool_size: Annotated[int, Field(ge=1)] = 190
    """Server connections per user/database pair and pod: 190 + reservePoolSize 50 =
    maxDbConnections 240, and 2 pods x 240 = 480 fit the guide's PostgreSQL max_connections
    500 minus its 3 superuser slots (the guide's single pool of 500 would fill it)."""
    reserve_pool_size: Annotated[int, Field(ge=0)] = 50
    """Extra server connections when clients wait too long."""
    reserve_pool_timeout_seconds: Annotated[int, Field(ge=0)] = 5
    """Wait before the reserve pool is used."""
    server_lifetime_seconds: Annotated[int, Field(ge=0)] = 1800
    """Server connections older than this are closed when idle."""
    server_idle_timeout_seconds: Annotated[int, Field(ge=0)] = 300
    """Idle server connections are closed after this."""
    server_connect_timeout_seconds: Annotated[int, Field(ge=1)] = 15
    """Connect timeout toward PostgreSQL."""
    query_timeout_seconds: Annotated[int, Field(ge=0)] = 0
    """Cancel queries running longer (0 = off)."""
    query_wait_timeout_seconds: Annotated[int, Field(ge=0)] = 120
    """Clients waiting longer for a server connection get an error."""
    max_db_connections: Annotated[int, Field(ge=0)] = 240
    """Server connections per database per PgBouncer pod (0 = unlimited); replicas x this
    must stay below PostgreSQL's max_connections (guide: 500) minus its reserved slots."""
    max_user_connections: Annotated[int, Field(ge=0)] = 240
    """Server connections per user per PgBouncer pod (0 = unlimited)."""
    resources: Resources | None = None
    """Container resources. Unset: derived (see `gpuproxy-operator plan`): PgBouncer is
    single-threaded, so 500m CPU requested and a 1 CPU limit; memory for maxClientConn
    clients at the measured bytes per client."""

    cross_field_rules = (
        CrossFieldRule(
            check=lambda v: (v["max_db_connections"] == 0
                             or v["default_pool_size"] <= v["max_db_connections"]),
            message="defaultPoolSize must not exceed maxDbConnections",
            cel="self.maxDbConnections == 0 || self.defaultPoolSize <= self.maxDbConnections",
            reads=("maxDbConnections", "defaultPoolSize"),
            field_path=".defaultPoolSize",
        ),
    )


class RedisSpec(Model):
    """Redis for rate limiting: bundled (operator-managed, cache-only) or external."""

    mode: Literal["bundled", "external"] = "bundled"
    """bundled runs one Redis pod; external uses `url`."""
    url: Annotated[str, Field(pattern=r"^rediss?://")] | None = None
    """redis:// or rediss:// URL of an external Redis (mode external)."""
    password_secret_ref: SecretKeyRef | None = None
    """Password of the external Redis (optional), or of the bundled one. Unset with the
    bundled Redis: the operator creates the Secret `<cluster>-redis-auth` (key `password`)
    once, with a random password, and never regenerates it."""
    image: str | None = None
    """Image of the bundled Redis. Unset: the operator's default (the chart's
    `images.redis`)."""
    maxmemory: Annotated[str, Field(pattern=r"^[0-9]+(b|kb|mb|gb|k|m|g)?$")] = "1gb"
    """redis.conf maxmemory. The bundled Redis holds rate-limit counters only: 1gb keeps
    ~1.2M distinct clients' windows at the measured ~150 bytes per key (`plan` checks the
    target); the guide's 16gb is sized for a dedicated host."""
    maxmemory_policy: Literal[
        "allkeys-lru", "allkeys-lfu", "volatile-lru", "volatile-lfu", "allkeys-random",
        "volatile-ttl", "noeviction",
    ] = "allkeys-lru"
    """Eviction policy."""
    tcp_backlog: Annotated[int, Field(ge=128, le=1_048_576)] = 65535
    """redis.conf tcp-backlog (bounded by the pod's net.core.somaxconn)."""
    timeout_seconds: Annotated[int, Field(ge=0)] = 300
    """Idle client timeout."""
    tcp_keepalive_seconds: Annotated[int, Field(ge=0)] = 60
    """TCP keepalive toward clients."""
    io_threads: Annotated[int, Field(ge=1, le=128)] = 4
    """I/O threads (reads too)."""
    persistence: bool = False
    """RDB snapshots (save 900 1 / 300 10 / 60 10000) on a volume instead of cache-only."""
    storage_size: Annotated[str, Field(pattern=r"^[0-9]+(Mi|Gi|Ti)$")] = "20Gi"
    """Size of the PersistentVolumeClaim when persistence is on."""
    storage_class_name: str | None = None
    """StorageClass of that claim; empty uses the cluster default."""
    resources: Resources | None = None
    """Container resources of the bundled Redis. Unset: derived from maxmemory (plus
    fragmentation, and the snapshot fork's copy-on-write with persistence) and ioThreads."""

    cross_field_rules = (
        CrossFieldRule(
            check=lambda v: v["mode"] != "external" or bool(v["url"]),
            message="url is required when mode is external",
            cel="self.mode != 'external' || has(self.url)",
            reads=("mode",),
            field_path=".url",
        ),
    )


# Bounds the ignored legacy map, so an old CR stays valid and cheap to validate.
MAX_SYSCTLS = 64


class NodeTuningSpec(Model):
    """Whether this cluster wants tuned nodes. Node tuning is the platform's: the chart's
    DaemonSet (values `nodeTuning.*`), never a pod the operator creates for a cluster."""

    enabled: bool = True
    """Ask for the platform's node tuning: the NodeTuningReady condition says whether the
    operator's installation provides it (it does not gate Ready)."""
    image: str | None = None
    """Ignored (deprecated): the chart chooses the node-tuning image. Reported in the
    NodeTuningReady condition while set; remove it."""
    sysctls: dict[str, str] | None = Field(default=None, max_length=MAX_SYSCTLS)
    """Ignored (deprecated): the chart's `nodeTuning.sysctls` allowlist applies. Reported in
    the NodeTuningReady condition while set; remove it."""
    node_selector: dict[str, str] | None = None
    """Ignored (deprecated): the chart's `nodeTuning.nodeSelector` applies."""
    tolerations: list[Toleration] | None = Field(default=None, max_length=64)
    """Ignored (deprecated): the chart's `nodeTuning.tolerations` apply."""

    def ignored_fields(self) -> list[str]:
        """The legacy fields this spec still sets (an older CRD defaulted image and sysctls
        into every stored cluster), as camelCase names."""
        legacy = {"image": self.image, "sysctls": self.sysctls,
                  "nodeSelector": self.node_selector, "tolerations": self.tolerations}
        return [name for name, value in legacy.items() if value is not None]


class PrometheusRuleSpec(Model):
    """The PrometheusRule with the guide's alerts."""

    enabled: bool = True
    """Create the PrometheusRule (needs the prometheus-operator CRDs)."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Extra labels, to match your Prometheus' ruleSelector."""
    error_rate_threshold: Annotated[float, Field(gt=0, le=1)] = 0.05
    """HighErrorRate fires above this fraction of 5xx responses."""
    p99_latency_ms_threshold: Annotated[int, Field(ge=1)] = 5000
    """HighLatency fires when p99 request duration exceeds this (ms)."""
    db_pool_utilization_threshold: Annotated[float, Field(gt=0, le=1)] = 0.9
    """DatabasePoolExhaustion fires above this pool utilisation."""
    connection_saturation_threshold: Annotated[float, Field(gt=0, le=1)] = 0.9
    """ConnectionSaturation fires above this fraction of connectionsPerReplica."""


class ServiceMonitorSpec(Model):
    """A ServiceMonitor so Prometheus scrapes the proxies."""

    enabled: bool | None = None
    """Create the ServiceMonitor (needs the prometheus-operator CRDs). Unset: the same as
    prometheusRule.enabled, because the alerts read the series this scrape produces."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Extra labels, to match your Prometheus' serviceMonitorSelector."""
    interval: Annotated[str, Field(pattern=r"^[0-9]+(ms|s|m|h)$")] = "30s"
    """Scrape interval."""


class SpendAlertSpec(Model):
    """Spend alerts, from the proxy's gpuproxy_spend_usd_total (priced by
    spec.proxy.budgets.prices) over the last 24 hours."""

    daily_budget_usd: Annotated[float, Field(gt=0)] | None = None
    """GpuProxyDailySpendOverBudget fires when the whole cluster spent more than this in the
    last 24 hours (USD). Unset: no cluster-wide spend alert."""
    per_team: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)
    """Team name -> USD per 24 hours: GpuProxyTeamDailySpendOverBudget fires for a team over
    its amount ("" is the keys without a team)."""
    warning_percent: Annotated[int, Field(ge=0, le=99)] = 80
    """The *NearBudget warnings fire at this percentage of each amount; 0: no warnings."""


class MonitoringSpec(Model):
    """Prometheus integration."""

    prometheus_rule: PrometheusRuleSpec = Field(default_factory=PrometheusRuleSpec)
    """Alert rules."""
    spend: SpendAlertSpec = Field(default_factory=SpendAlertSpec)
    """Daily spend alerts (in the PrometheusRule), with their thresholds."""
    service_monitor: ServiceMonitorSpec = Field(default_factory=ServiceMonitorSpec)
    """Scrape configuration."""

    @model_validator(mode="before")
    @classmethod
    def _scrape_follows_rules(cls, data: Any) -> Any:
        # Resolved here rather than as a CRD default, which could not depend on another field;
        # afterwards serviceMonitor.enabled is always a bool for every reader.
        if not isinstance(data, dict):
            return data
        rule_key = "prometheus_rule" if "prometheus_rule" in data else "prometheusRule"
        scrape_key = "service_monitor" if "service_monitor" in data else "serviceMonitor"
        rule, scrape = data.get(rule_key), data.get(scrape_key)
        if isinstance(scrape, ServiceMonitorSpec) and scrape.enabled is not None:
            return data
        if isinstance(scrape, dict) and scrape.get("enabled") is not None:
            return data
        rule_on = (rule.get("enabled") if isinstance(rule, dict)
                   else getattr(rule, "enabled", None))
        follow = True if rule_on is None else rule_on
        if isinstance(scrape, ServiceMonitorSpec):
            scrape = scrape.model_dump(by_alias=True)
        return {**data, scrape_key: {**(scrape or {}), "enabled": follow}}
