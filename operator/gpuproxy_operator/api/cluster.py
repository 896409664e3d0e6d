"""The GpuProxyCluster resource: spec, status and the parsed object the operator works on."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError

from gpuproxy_operator.api.base import DNS_LABEL, KIND, Model
from gpuproxy_operator.api.components import (
    AutoscalingSpec,
    DatabaseSpec,
    MonitoringSpec,
    NodeTuningSpec,
    PgBouncerSpec,
    RedisSpec,
)
from gpuproxy_operator.api.proxy import ProxySpec

# Child names append up to 23 characters ("-pgbouncer", "-redis-headless", ...) and a
# StatefulSet's pods add a revision hash: 40 keeps every child within Kubernetes' limits.
MAX_NAME_LENGTH = 40

Phase = Literal["Pending", "Progressing", "Ready", "Degraded", "Paused"]


class GpuProxyClusterSpec(Model):
    """Desired state of a GPU inference proxy stack."""

    proxy: ProxySpec
    """The proxy data plane."""
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec)
    """Connection-based autoscaling of the proxy."""
    database: DatabaseSpec
    """The PostgreSQL that stores usage records and API keys."""
    pgbouncer: PgBouncerSpec = Field(default_factory=PgBouncerSpec)
    """PgBouncer between the proxies and PostgreSQL."""
    redis: RedisSpec = Field(default_factory=RedisSpec)
    """Redis for shared rate limits."""
    node_tuning: NodeTuningSpec = Field(default_factory=NodeTuningSpec)
    """Kernel tuning of the nodes."""
    monitoring: MonitoringSpec = Field(default_factory=MonitoringSpec)
    """Prometheus alerts and scraping."""
    paused: bool = False
    """Stop changing child objects (status still updates)."""


class Condition(Model):
    """A status condition, as in Kubernetes API conventions."""

    type: str
    """Ready, Progressing, Degraded, Paused, Scaling or a component (ProxyReady, ...)."""
    status: Literal["True", "False", "Unknown"]
    """Condition status."""
    reason: str = ""
    """One-word CamelCase reason."""
    message: str = ""
    """What happened and what to do, for a person."""
    last_transition_time: str | None = None
    """When status last changed (RFC 3339)."""
    observed_generation: int | None = None
    """The spec generation this condition describes."""


class Endpoints(Model):
    """In-cluster addresses of the stack."""

    proxy: str | None = None
    """Client URL of the proxy Service."""
    metrics: str | None = None
    """Metrics URL of the proxy Service."""
    pgbouncer: str | None = None
    """host:port of PgBouncer."""
    redis: str | None = None
    """redis:// URL in use."""


class GpuProxyClusterStatus(Model):
    """Observed state, written by the operator."""

    phase: Phase | None = None
    """Pending, Progressing, Ready, Degraded or Paused."""
    conditions: list[Condition] = Field(default_factory=list)
    """Latest observations."""
    observed_generation: int | None = None
    """The spec generation the status describes."""
    replicas: int | None = None
    """Proxy pods (for the scale subresource)."""
    ready_replicas: int | None = None
    """Ready proxy pods."""
    selector: str | None = None
    """Label selector of the proxy pods (for the scale subresource)."""
    current_connections: int | None = None
    """Client connections across all proxy pods at the last scrape."""
    desired_replicas: int | None = None
    """Replicas the autoscaler last asked for."""
    replicas_owner: Literal["Autoscaler", "Spec", "External"] | None = None
    """Who sets the proxy Deployment's replicas: the autoscaler (spec.autoscaling.enabled),
    spec.proxy.replicas, or a HorizontalPodAutoscaler on the Deployment (left alone)."""
    replicas_owner_message: str | None = None
    """Why that owner, and how to change the replicas."""
    handover_spec_replicas: int | None = None
    """spec.proxy.replicas while another owner has the replicas; after a handover to Spec the
    Deployment keeps its count until spec.proxy.replicas differs from this."""
    last_scale_time: str | None = None
    """When the autoscaler last changed replicas (RFC 3339)."""
    endpoints: Endpoints = Field(default_factory=Endpoints)
    """In-cluster addresses."""
    autoscaler_state: str | None = None
    """Opaque autoscaler memory (recent recommendations and scale events), so a restarted
    operator keeps its stabilization windows."""


class ObjectMeta(Model):
    """The parts of metadata the builders need."""

    model_config = Model.model_config | {"extra": "ignore", "alias_generator": None}

    name: Annotated[str, Field(pattern=DNS_LABEL, min_length=1, max_length=MAX_NAME_LENGTH)]
    namespace: Annotated[str, Field(min_length=1)] = "default"
    uid: str = ""
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)


class GpuProxyCluster(Model):
    """A whole GpuProxyCluster object, parsed."""

    model_config = Model.model_config | {"extra": "ignore"}

    api_version: Literal["gpuproxy.aiserve.farm/v1alpha1"] = "gpuproxy.aiserve.farm/v1alpha1"
    kind: Literal["GpuProxyCluster"] = "GpuProxyCluster"
    metadata: ObjectMeta
    spec: GpuProxyClusterSpec


class InvalidSpecError(ValueError):
    """A resource failed validation; `problems` are (field path, reason) pairs."""

    def __init__(self, obj: str, problems: list[tuple[str, str]]) -> None:
        self.obj = obj
        self.problems = problems
        detail = "; ".join(f"{path}: {reason}" for path, reason in problems)
        super().__init__(f"{obj} is invalid: {detail}")


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith("function-after[") or part.startswith("function-before["):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def _without_nulls(value: Any) -> Any:
    """Drop null fields, as the API server prunes nulls of non-nullable fields before
    defaulting (`autoscaling: null` means the defaults, not an error)."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def parse_cluster(body: dict[str, Any]) -> GpuProxyCluster:
    """Parse a GpuProxyCluster body, raising InvalidSpecError with field paths on bad input.

    Parsed as strict JSON, the way the API server types it: "3" is not an integer, "true" not
    a boolean and 0.5 not a quantity there, so they are not here either (render and the API
    server refuse the same specs)."""
    meta = body.get("metadata") or {}
    label = f"{KIND} {meta.get('namespace', 'default')}/{meta.get('name', '?')}"
    try:
        # default=str: YAML timestamps and the like reach the API server as JSON strings.
        text = json.dumps(_without_nulls(body), default=str)
        return GpuProxyCluster.model_validate_json(text, strict=True)
    except ValidationError as exc:
        problems = [
            (_path(tuple(e["loc"])), e["msg"].removeprefix("Value error, "))
            for e in exc.errors()
        ]
        raise InvalidSpecError(label, problems) from exc
