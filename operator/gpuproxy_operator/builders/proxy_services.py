"""The proxy's supporting objects: client and metrics Services, ServiceAccount and the
PodDisruptionBudget."""

from __future__ import annotations

from typing import Any

from gpuproxy_operator.api.cluster import GpuProxyCluster
from gpuproxy_operator.builders.common import (
    Manifest,
    metadata,
    selector,
    service_port,
    with_spec_hash,
)
from gpuproxy_operator.builders.images import proxy_image
from gpuproxy_operator.naming import PREFIX, child_name

METRICS_SUFFIX = "metrics"
METRICS_PORT_NAME = "admin"
# Tells the metrics Service apart from the client Service (both select the proxy pods).
METRICS_LABEL = f"{PREFIX}/metrics"


def build_proxy_service(cluster: GpuProxyCluster) -> Manifest:
    proxy = cluster.spec.proxy
    svc = proxy.service
    spec: dict[str, Any] = {
        "type": svc.type,
        "selector": selector(cluster, "proxy"),
        "ports": [service_port("http", svc.port, "http")],
    }
    if proxy.tls is not None:
        # The port keeps its name (Ingresses may refer to it); ingress controllers and meshes
        # read appProtocol to speak TLS to the proxy.
        spec["ports"][0]["appProtocol"] = "https"
    if svc.type != "ClusterIP" and svc.external_traffic_policy is not None:
        spec["externalTrafficPolicy"] = svc.external_traffic_policy
    if svc.type == "LoadBalancer" and svc.load_balancer_source_ranges:
        spec["loadBalancerSourceRanges"] = list(svc.load_balancer_source_ranges)
    return with_spec_hash({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(
            cluster,
            child_name(cluster.metadata.name, "proxy"),
            "proxy",
            proxy_image(cluster),
            annotations=dict(sorted(svc.annotations.items())),
        ),
        "spec": spec,
    })


def build_proxy_metrics_service(cluster: GpuProxyCluster) -> Manifest:
    """ClusterIP Service on the admin port; its name is the Prometheus `job` of the alerts."""
    proxy = cluster.spec.proxy
    return with_spec_hash({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(
            cluster,
            child_name(cluster.metadata.name, "proxy", METRICS_SUFFIX),
            "proxy",
            proxy_image(cluster),
            extra_labels={METRICS_LABEL: "true"},
        ),
        "spec": {
            "type": "ClusterIP",
            "selector": selector(cluster, "proxy"),
            "ports": [service_port(METRICS_PORT_NAME, proxy.admin_port, "admin")],
        },
    })


def build_proxy_service_account(cluster: GpuProxyCluster) -> Manifest:
    """No token by default: only the proxy pods of a cluster with backend discovery ask for
    one (builders/proxy.py), to watch EndpointSlices."""
    return with_spec_hash({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": metadata(cluster, child_name(cluster.metadata.name, "proxy"), "proxy",
                             proxy_image(cluster)),
        "automountServiceAccountToken": False,
    })


def build_proxy_pdb(cluster: GpuProxyCluster) -> Manifest | None:
    pdb = cluster.spec.proxy.pod_disruption_budget
    if not pdb.enabled:
        return None
    return with_spec_hash({
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(cluster, child_name(cluster.metadata.name, "proxy"), "proxy",
                             proxy_image(cluster)),
        "spec": {
            "maxUnavailable": pdb.max_unavailable,
            "selector": {"matchLabels": selector(cluster, "proxy")},
        },
    })
