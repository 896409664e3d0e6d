"""What the builders need beyond the CR: values the operator reads from the cluster and its
own configuration."""

from __future__ import annotations

from dataclasses import dataclass, field

from gpuproxy_operator.builders.images import OperandImages


@dataclass(frozen=True)
class DatabaseCredentials:
    """The login role from spec.database.credentialsSecret (keys `username`, `password`)."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class OperatorPeer:
    """Where the operator's pods run, so the proxy NetworkPolicy lets them read /stats."""

    namespace: str
    pod_labels: dict[str, str] = field(default_factory=dict)
    """Labels of the operator's pods; empty: every pod of its namespace."""


@dataclass(frozen=True)
class BuildInputs:
    database_credentials: DatabaseCredentials | None = None
    """None -> no PgBouncer userlist Secret is built."""
    proxy_replicas: int | None = None
    """The autoscaler's decision; None -> spec.proxy.replicas (clamped to
    [minReplicas, maxReplicas] while autoscaling is on)."""
    images: OperandImages = field(default_factory=OperandImages)
    """The operator's default images, for image fields the spec leaves unset."""
    operator: OperatorPeer | None = None
    """The operator's pods; None (offline render): the proxy's admin port admits only
    spec.proxy.networkPolicy.metricsFrom."""
