"""Names, labels and annotation keys of the objects the operator owns: one place for all of them."""

from __future__ import annotations

from typing import Literal

from gpuproxy_operator.api.base import GROUP

Component = Literal["proxy", "pgbouncer", "redis", "node-tuning", "monitoring", "backup"]

PREFIX = GROUP  # our own annotation/label/finalizer prefix
SPEC_HASH_ANNOTATION = f"{PREFIX}/spec-hash"
CONFIG_HASH_ANNOTATION = f"{PREFIX}/config-hash"
# On every child reconcile wrote: the content it applied last (without Secret/ConfigMap data),
# so a key removed from the desired body can be removed (nulled) by the next merge patch.
LAST_APPLIED_ANNOTATION = f"{PREFIX}/last-applied"
# On a child whose data the operator generated once (a random password): never rewritten.
GENERATED_ONCE_ANNOTATION = f"{PREFIX}/generated-once"
CLUSTER_LABEL = f"{PREFIX}/cluster"
MANAGED_BY = "gpuproxy-operator"
PART_OF = "gpuproxy"


def child_name(cluster: str, component: Component, suffix: str = "") -> str:
    """`<cluster>-<component>[-<suffix>]`, e.g. `prod-proxy`, `prod-proxy-metrics`."""
    name = f"{cluster}-{component}"
    return f"{name}-{suffix}" if suffix else name


def selector_labels(cluster: str, component: Component) -> dict[str, str]:
    """Labels that select one component's pods; never change them (selectors are immutable)."""
    return {
        "app.kubernetes.io/name": "gpuproxy",
        "app.kubernetes.io/instance": cluster,
        "app.kubernetes.io/component": component,
    }


def common_labels(cluster: str, component: Component, version: str) -> dict[str, str]:
    """Recommended labels on every child object."""
    return {
        **selector_labels(cluster, component),
        "app.kubernetes.io/part-of": PART_OF,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/version": version,
        CLUSTER_LABEL: cluster,
    }
