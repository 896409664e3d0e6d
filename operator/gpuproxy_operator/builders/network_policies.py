"""NetworkPolicies: Redis and PgBouncer accept only the proxy pods, and PgBouncer reaches
only the database port and DNS."""

from __future__ import annotations

from typing import Any

from gpuproxy_operator.api.cluster import GpuProxyCluster
from gpuproxy_operator.builders.common import Manifest, metadata, selector, with_spec_hash
from gpuproxy_operator.builders.proxy_config import PGBOUNCER_PORT, REDIS_PORT
from gpuproxy_operator.naming import Component, child_name


def _policy(
    cluster: GpuProxyCluster,
    component: Component,
    image: str,
    port: int,
    egress: list[dict[str, Any]] | None,
) -> Manifest:
    spec: dict[str, Any] = {
        "podSelector": {"matchLabels": selector(cluster, component)},
        "policyTypes": ["Ingress"] if egress is None else ["Ingress", "Egress"],
        "ingress": [
            {
                "from": [{"podSelector": {"matchLabels": selector(cluster, "proxy")}}],
                "ports": [{"protocol": "TCP", "port": port}],
            }
        ],
    }
    if egress is not None:
        spec["egress"] = egress
    return with_spec_hash({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(
            cluster, child_name(cluster.metadata.name, component), component, image
        ),
        "spec": spec,
    })


def build_redis_network_policy(cluster: GpuProxyCluster) -> Manifest | None:
    if cluster.spec.redis.mode != "bundled":
        return None
    # Redis opens no connections of its own: all egress is denied.
    return _policy(cluster, "redis", cluster.spec.redis.image, REDIS_PORT, egress=[])


def build_pgbouncer_network_policy(cluster: GpuProxyCluster) -> Manifest:
    """The database may live anywhere (in or out of the cluster), so egress is limited by
    port rather than by peer; DNS is needed to resolve spec.database.host."""
    egress = [
        {"ports": [{"protocol": "TCP", "port": cluster.spec.database.port}]},
        {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
    ]
    return _policy(cluster, "pgbouncer", cluster.spec.pgbouncer.image, PGBOUNCER_PORT, egress)
