"""The proxy's NetworkPolicy, evaluated the way NetworkPolicy semantics define it (a rule's
peers OR-ed, a peer's namespace and pod selectors AND-ed, a rule without `from`/`to` matching
everyone): clients get in, the admin port admits only the operator and Prometheus (so the
autoscaler's /stats scrape works under a default-deny), and egress reaches only DNS, the
backends, PgBouncer and Redis."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from tests.operator.clusters import CREDENTIALS, by_key, cluster, minimal_body, production_body

from gpuproxy_operator.builders import BuildInputs, OperatorPeer, build_all
from gpuproxy_operator.naming import selector_labels

OPERATOR = OperatorPeer("gpuproxy-system", {"app.kubernetes.io/name": "gpuproxy-operator",
                                            "app.kubernetes.io/instance": "gp"})


@dataclass(frozen=True)
class Peer:
    namespace: str
    labels: dict[str, str] = field(default_factory=dict)
    ip: str = "10.1.2.3"


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def _peer_matches(rule_peer: dict[str, Any], peer: Peer, policy_ns: str) -> bool:
    if "ipBlock" in rule_peer:
        return ipaddress.ip_address(peer.ip) in ipaddress.ip_network(rule_peer["ipBlock"]["cidr"])
    ns_labels = {"kubernetes.io/metadata.name": peer.namespace}
    if "namespaceSelector" in rule_peer:
        if not _matches(rule_peer["namespaceSelector"], ns_labels):
            return False
    elif peer.namespace != policy_ns:
        return False
    return "podSelector" not in rule_peer or _matches(rule_peer["podSelector"], peer.labels)


def allowed(policy: dict[str, Any], direction: str, peer: Peer, port: int,
            protocol: str = "TCP") -> bool:
    spec, ns = policy["spec"], policy["metadata"]["namespace"]
    rules, side = (spec["ingress"], "from") if direction == "ingress" else (spec["egress"], "to")
    for rule in rules:
        ports = rule.get("ports")
        if ports and not any(p["port"] == port and p.get("protocol", "TCP") == protocol
                             for p in ports):
            continue
        peers = rule.get(side)
        if not peers or any(_peer_matches(p, peer, ns) for p in peers):
            return True
    return False


def _policy(body: dict[str, Any], operator: OperatorPeer | None = OPERATOR) -> dict[str, Any]:
    objs = by_key(build_all(cluster(body), BuildInputs(CREDENTIALS, operator=operator)))
    name = body["metadata"]["name"]
    policy = objs[("NetworkPolicy", f"{name}-proxy")]
    assert policy["spec"]["podSelector"]["matchLabels"] == selector_labels(name, "proxy")
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    return policy


def test_clients_from_anywhere_by_default_and_the_admin_port_only_for_the_operator() -> None:
    policy = _policy(minimal_body())
    tenant_pod = Peer("default", {"app": "curl"})
    assert allowed(policy, "ingress", tenant_pod, 8080)
    assert allowed(policy, "ingress", Peer("elsewhere", ip="203.0.113.9"), 8080)
    assert not allowed(policy, "ingress", tenant_pod, 9090)
    # The autoscaler reads /stats from the operator's pods: admitted under a default-deny.
    assert allowed(policy, "ingress", Peer("gpuproxy-system", OPERATOR.pod_labels), 9090)
    assert not allowed(policy, "ingress", Peer("gpuproxy-system", {"app": "other"}), 9090)
    assert not allowed(policy, "ingress", Peer("team-b", OPERATOR.pod_labels), 9090)
    # Prometheus (default metricsFrom) scrapes /metrics from any namespace.
    prometheus = Peer("monitoring", {"app.kubernetes.io/name": "prometheus"})
    assert allowed(policy, "ingress", prometheus, 9090)
    assert not allowed(policy, "ingress", Peer("default", OPERATOR.pod_labels), 5432)


def test_configured_clients_and_scrapers() -> None:
    body = minimal_body()
    body["spec"]["proxy"]["networkPolicy"] = {
        "clientCidrs": ["192.0.2.0/24"], "clientNamespaces": ["ingress"],
        "metricsFrom": [{"namespaceSelector": {"kubernetes.io/metadata.name": "obs"},
                         "podSelector": {"app": "vm"}}]}
    policy = _policy(body)
    assert allowed(policy, "ingress", Peer("x", ip="192.0.2.77"), 8080)
    assert allowed(policy, "ingress", Peer("ingress", {"any": "pod"}), 8080)
    assert not allowed(policy, "ingress", Peer("default", ip="10.9.9.9"), 8080)
    assert allowed(policy, "ingress", Peer("obs", {"app": "vm"}), 9090)
    assert not allowed(policy, "ingress",
                       Peer("monitoring", {"app.kubernetes.io/name": "prometheus"}), 9090)
    assert allowed(policy, "ingress", Peer("gpuproxy-system", OPERATOR.pod_labels), 9090)


def test_egress_reaches_dns_backends_pgbouncer_and_redis_only() -> None:
    body = production_body()
    body["spec"]["proxy"]["backends"] += [
        {"name": "ip-0", "url": "http://10.20.0.5:8001"},
        {"name": "ip6-0", "url": "https://[fd00::7]"},
    ]
    policy = _policy(body)
    ns = body["metadata"]["namespace"]
    anywhere = Peer("kube-system", {"k8s-app": "kube-dns"}, "10.96.0.10")
    assert allowed(policy, "egress", anywhere, 53, "UDP")
    assert allowed(policy, "egress", anywhere, 53, "TCP")
    pgbouncer = Peer(ns, selector_labels("prod", "pgbouncer"))
    redis = Peer(ns, selector_labels("prod", "redis"))
    assert allowed(policy, "egress", pgbouncer, 6432)
    assert allowed(policy, "egress", redis, 6379)
    assert not allowed(policy, "egress", Peer(ns, {"app": "x"}), 6379)
    assert not allowed(policy, "egress", Peer("db", ip="10.0.0.9"), 5432)  # only via PgBouncer
    # DNS-named backends by port (http://a100-0...:8000, https://h100-0... -> 443).
    assert allowed(policy, "egress", Peer("gpu", ip="10.50.0.1"), 8000)
    assert allowed(policy, "egress", Peer("gpu", ip="10.50.0.1"), 443)
    # IP literals by address and port.
    assert allowed(policy, "egress", Peer("gpu", ip="10.20.0.5"), 8001)
    assert not allowed(policy, "egress", Peer("gpu", ip="10.20.0.6"), 8001)
    assert allowed(policy, "egress", Peer("gpu", ip="fd00::7"), 443)
    assert not allowed(policy, "egress", Peer("gpu", ip="10.50.0.1"), 22)


def test_external_redis_by_address_and_the_policy_can_be_turned_off() -> None:
    body = minimal_body()
    body["spec"]["redis"] = {"mode": "external", "url": "redis://10.30.0.4:6380/0"}
    policy = _policy(body)
    assert allowed(policy, "egress", Peer("x", ip="10.30.0.4"), 6380)
    assert not allowed(policy, "egress", Peer("x", ip="10.30.0.5"), 6380)
    body["spec"]["proxy"]["networkPolicy"] = {"enabled": False}
    objs = by_key(build_all(cluster(body), BuildInputs(CREDENTIALS, operator=OPERATOR)))
    assert ("NetworkPolicy", "mini-proxy") not in objs


def test_without_a_known_operator_namespace_only_metrics_from_is_admitted() -> None:
    policy = _policy(minimal_body(), operator=None)
    assert not allowed(policy, "ingress", Peer("gpuproxy-system", OPERATOR.pod_labels), 9090)
    assert allowed(policy, "ingress",
                   Peer("monitoring", {"app.kubernetes.io/name": "prometheus"}), 9090)


def test_admin_api_port_only_from_the_operator_and_only_with_an_admin_token() -> None:
    """Issue 11: key management is neither for clients nor for scrapers (metricsFrom)."""
    policy = _policy(production_body())
    operator_pod = Peer("gpuproxy-system", OPERATOR.pod_labels)
    assert allowed(policy, "ingress", operator_pod, 9091)
    assert not allowed(policy, "ingress", Peer("gpuproxy-system", {"app": "other"}), 9091)
    assert not allowed(policy, "ingress", Peer("aiserve-farm", {"app": "curl"}), 9091)
    assert not allowed(policy, "ingress", Peer("x", ip="203.0.113.9"), 9091)
    # Prometheus (the default metricsFrom) scrapes 9090 and gets nothing here.
    prometheus = Peer("monitoring", {"app.kubernetes.io/name": "prometheus"})
    assert allowed(policy, "ingress", prometheus, 9090)
    assert not allowed(policy, "ingress", prometheus, 9091)
    # No admin token: no admin API, no rule for it.
    assert not allowed(_policy(minimal_body()), "ingress", operator_pod, 9091)
    # Without a known operator peer nobody is admitted (port-forward still works).
    assert not allowed(_policy(production_body(), operator=None), "ingress", operator_pod, 9091)
