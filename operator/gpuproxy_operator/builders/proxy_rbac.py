"""The proxy's own RBAC, only with spec.proxy.backendDiscovery: a Role that may list and watch
EndpointSlices in the cluster's namespace (nothing else), bound to the proxy's ServiceAccount."""

from __future__ import annotations

from gpuproxy_operator.api.cluster import GpuProxyCluster
from gpuproxy_operator.builders.common import Manifest, metadata, with_spec_hash
from gpuproxy_operator.builders.images import proxy_image
from gpuproxy_operator.naming import child_name

DISCOVERY_RULES = [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                    "verbs": ["list", "watch"]}]


def discovery_enabled(cluster: GpuProxyCluster) -> bool:
    return bool(cluster.spec.proxy.backend_discovery)


def build_proxy_discovery_role(cluster: GpuProxyCluster) -> Manifest | None:
    if not discovery_enabled(cluster):
        return None
    name = child_name(cluster.metadata.name, "proxy")
    return with_spec_hash({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": metadata(cluster, name, "proxy", proxy_image(cluster)),
        "rules": DISCOVERY_RULES,
    })


def build_proxy_discovery_role_binding(cluster: GpuProxyCluster) -> Manifest | None:
    if not discovery_enabled(cluster):
        return None
    name = child_name(cluster.metadata.name, "proxy")
    return with_spec_hash({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": metadata(cluster, name, "proxy", proxy_image(cluster)),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name,
                      "namespace": cluster.metadata.namespace}],
    })
