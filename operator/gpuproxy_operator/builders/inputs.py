"""What the builders need beyond the CR: values the operator reads from the cluster."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DatabaseCredentials:
    """The login role from spec.database.credentialsSecret (keys `username`, `password`)."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class BuildInputs:
    database_credentials: DatabaseCredentials | None = None
    """None -> no PgBouncer userlist Secret is built."""
    proxy_replicas: int | None = None
    """The autoscaler's decision; None -> spec.proxy.replicas (clamped to
    [minReplicas, maxReplicas] while autoscaling is on)."""
