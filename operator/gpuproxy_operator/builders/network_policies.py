"""NetworkPolicies: the proxy pods admit clients on the client port and only the operator and
Prometheus on the admin port, and reach only DNS, the backends, PgBouncer and Redis; Redis
and PgBouncer accept only the proxy pods, and PgBouncer reaches only the database port and DNS."""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import urlsplit

from gpuproxy_operator.api.cluster import GpuProxyCluster
from gpuproxy_operator.api.proxy import NetworkPeer
from gpuproxy_operator.builders.common import Manifest, metadata, selector, with_spec_hash
from gpuproxy_operator.builders.images import pgbouncer_image, proxy_image, redis_image
from gpuproxy_operator.builders.inputs import OperatorPeer
from gpuproxy_operator.builders.proxy_config import PGBOUNCER_PORT, REDIS_PORT, admin_api_port
from gpuproxy_operator.naming import Component, child_name

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
DNS_PORTS = [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]
_SCHEME_PORTS = {"http": 80, "https": 443, "redis": REDIS_PORT, "rediss": REDIS_PORT}


def _tcp(port: int | str) -> dict[str, Any]:
    return {"protocol": "TCP", "port": port}


def _manifest(cluster: GpuProxyCluster, component: Component, image: str,
              spec: dict[str, Any]) -> Manifest:
    return with_spec_hash({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(
            cluster, child_name(cluster.metadata.name, component), component, image
        ),
        "spec": spec,
    })


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
                "ports": [_tcp(port)],
            }
        ],
    }
    if egress is not None:
        spec["egress"] = egress
    return _manifest(cluster, component, image, spec)


def build_redis_network_policy(cluster: GpuProxyCluster) -> Manifest | None:
    if cluster.spec.redis.mode != "bundled":
        return None
    # Redis opens no connections of its own: all egress is denied.
    return _policy(cluster, "redis", redis_image(cluster), REDIS_PORT, egress=[])


def build_pgbouncer_network_policy(cluster: GpuProxyCluster) -> Manifest:
    """The database may live anywhere (in or out of the cluster), so egress is limited by
    port rather than by peer; DNS is needed to resolve spec.database.host."""
    egress = [
        {"ports": [_tcp(cluster.spec.database.port)]},
        {"ports": DNS_PORTS},
    ]
    return _policy(cluster, "pgbouncer", pgbouncer_image(cluster),
                   PGBOUNCER_PORT, egress)


def _peer(peer: NetworkPeer) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if peer.namespace_selector is not None:
        out["namespaceSelector"] = {"matchLabels": dict(sorted(peer.namespace_selector.items()))}
    if peer.pod_selector is not None:
        out["podSelector"] = {"matchLabels": dict(sorted(peer.pod_selector.items()))}
    return out


def _operator_peer(operator: OperatorPeer) -> dict[str, Any]:
    # Both selectors in one peer: pods with these labels in that namespace (AND, not OR).
    return {
        "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: operator.namespace}},
        "podSelector": {"matchLabels": dict(sorted(operator.pod_labels.items()))},
    }


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or _SCHEME_PORTS.get(parts.scheme, 80)


def _address_rules(targets: list[tuple[str, int]]) -> list[dict[str, Any]]:
    """An IP literal by address and port (ipBlock); a DNS name resolves to addresses a policy
    cannot name, so by port only."""
    by_port_only: set[int] = set()
    by_address: dict[tuple[str, int], None] = {}
    for host, port in targets:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            by_port_only.add(port)
            continue
        by_address[(f"{address}/{address.max_prefixlen}", port)] = None
    rules: list[dict[str, Any]] = [{"to": [{"ipBlock": {"cidr": cidr}}], "ports": [_tcp(port)]}
                                   for cidr, port in sorted(by_address)]
    if by_port_only:
        rules.append({"ports": [_tcp(port) for port in sorted(by_port_only)]})
    return rules


def _proxy_ingress(cluster: GpuProxyCluster, operator: OperatorPeer | None
                   ) -> list[dict[str, Any]]:
    proxy = cluster.spec.proxy
    policy = proxy.network_policy
    client: dict[str, Any] = {"ports": [_tcp(proxy.port)]}
    sources = [{"ipBlock": {"cidr": cidr}} for cidr in policy.client_cidrs] + [
        {"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: ns}}}
        for ns in policy.client_namespaces]
    if sources:
        client["from"] = sources
    admin_from = [_peer(p) for p in policy.metrics_from]
    if operator is not None:
        admin_from.insert(0, _operator_peer(operator))
    rules = [client]
    if admin_from:
        rules.append({"from": admin_from, "ports": [_tcp(proxy.admin_port)]})
    api_port = admin_api_port(cluster)
    if operator is not None and api_port is not None:
        # Key management: the operator's namespace only, never metricsFrom (scrapers need
        # /metrics, not keys); people reach it by port-forward, which no policy filters.
        rules.append({"from": [_operator_peer(operator)], "ports": [_tcp(api_port)]})
    return rules


def _proxy_egress(cluster: GpuProxyCluster) -> list[dict[str, Any]]:
    redis = cluster.spec.redis
    rules: list[dict[str, Any]] = [
        {"ports": DNS_PORTS},
        {"to": [{"podSelector": {"matchLabels": selector(cluster, "pgbouncer")}}],
         "ports": [_tcp(PGBOUNCER_PORT)]},
    ]
    targets = [_host_port(str(b.url)) for b in cluster.spec.proxy.backends]
    if redis.mode == "bundled":
        rules.append({"to": [{"podSelector": {"matchLabels": selector(cluster, "redis")}}],
                      "ports": [_tcp(REDIS_PORT)]})
    elif redis.url is not None:
        targets.append(_host_port(redis.url))
    return rules + _address_rules(targets) + _discovery_egress(cluster)


# Where the in-cluster API server listens (the kubernetes Service's 443, or the apiserver's
# own 6443 that some CNIs match after DNAT). Not a pod, so by port only.
API_SERVER_PORTS = (443, 6443)


def _discovery_egress(cluster: GpuProxyCluster) -> list[dict[str, Any]]:
    """Backend discovery: the API server (the EndpointSlice watch) and the discovered pods'
    port, by port only (their addresses come and go)."""
    sources = cluster.spec.proxy.backend_discovery
    if not sources:
        return []
    ports: dict[int | str, None] = {s.port: None for s in sources}
    return [
        {"ports": [_tcp(port) for port in API_SERVER_PORTS]},
        {"ports": [{"protocol": "TCP", "port": port} for port in ports]},
    ]


def build_proxy_network_policy(cluster: GpuProxyCluster, operator: OperatorPeer | None
                               ) -> Manifest | None:
    """The proxy pods' policy: under a namespace's default-deny, the clients, the operator's
    /stats reads (autoscaling) and Prometheus still get in, and the proxy still reaches what
    it needs."""
    if not cluster.spec.proxy.network_policy.enabled:
        return None
    return _manifest(cluster, "proxy", proxy_image(cluster), {
        "podSelector": {"matchLabels": selector(cluster, "proxy")},
        "policyTypes": ["Ingress", "Egress"],
        "ingress": _proxy_ingress(cluster, operator),
        "egress": _proxy_egress(cluster),
    })
