"""What the platform admin decided when installing the operator (the chart sets these as
environment variables): the operands' default images, where the operator's pods run, and
whether the platform's node tuning is installed."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from gpuproxy_operator.builders.images import OperandImages
from gpuproxy_operator.builders.inputs import OperatorPeer

ENV_PROXY_IMAGE = "GPUPROXY_PROXY_IMAGE"
ENV_PGBOUNCER_IMAGE = "GPUPROXY_PGBOUNCER_IMAGE"
ENV_REDIS_IMAGE = "GPUPROXY_REDIS_IMAGE"
ENV_BACKUP_IMAGE = "GPUPROXY_BACKUP_IMAGE"
ENV_OPERATOR_POD_LABELS = "GPUPROXY_OPERATOR_POD_LABELS"
ENV_NODE_TUNING = "GPUPROXY_NODE_TUNING"


class PlatformConfigError(ValueError):
    """An environment variable the operator cannot use; the message names it."""


@dataclass(frozen=True)
class Platform:
    images: OperandImages = field(default_factory=OperandImages)
    operator: OperatorPeer | None = None
    """The operator's own pods (for the proxy NetworkPolicy); None outside a cluster."""
    node_tuning: str | None = None
    """`<namespace>/<name>` of the chart's node-tuning DaemonSet; None: not installed."""


def _labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PlatformConfigError(
                f"{ENV_OPERATOR_POD_LABELS}: {item!r} is not key=value (expected e.g. "
                "app.kubernetes.io/name=gpuproxy-operator,app.kubernetes.io/instance=NAME)")
        labels[key] = value
    return labels


def from_env(env: Mapping[str, str], namespace: str | None) -> Platform:
    """The platform from the chart's environment; `namespace` is the operator pod's own
    (None when it runs outside the cluster)."""
    defaults = OperandImages()
    images = OperandImages(
        proxy=env.get(ENV_PROXY_IMAGE) or defaults.proxy,
        pgbouncer=env.get(ENV_PGBOUNCER_IMAGE) or defaults.pgbouncer,
        redis=env.get(ENV_REDIS_IMAGE) or defaults.redis,
        backup=env.get(ENV_BACKUP_IMAGE) or defaults.backup,
    )
    operator = None
    if namespace:
        operator = OperatorPeer(namespace, _labels(env.get(ENV_OPERATOR_POD_LABELS, "")))
    return Platform(images, operator, env.get(ENV_NODE_TUNING) or None)
