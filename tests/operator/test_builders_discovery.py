"""Backend discovery's objects: the proxy's least-privilege Role (list/watch EndpointSlices in
its namespace) and RoleBinding, a token for the proxy pods, egress to the API server and to the
discovered port, and the proxy config's discovery section; none of it without discovery."""

from __future__ import annotations

import yaml
from tests.operator.clusters import CREDENTIALS, by_key, cluster, discovery_body, minimal_body
from tests.operator.test_builders_network_policies import OPERATOR, Peer, allowed

from gpuproxy_operator.builders import BuildInputs, build_all
from gpuproxy_operator.builders.proxy_config import build_proxy_config
from gpuproxy_proxy.config import ProxyConfig


def _objects(body: dict[str, object]) -> dict[tuple[str, str], dict[str, object]]:
    return by_key(build_all(cluster(body), BuildInputs(CREDENTIALS, operator=OPERATOR)))


def test_role_grants_only_list_and_watch_on_endpointslices_to_the_proxy() -> None:
    objs = _objects(discovery_body())
    role = objs[("Role", "mini-proxy")]
    assert role["metadata"]["namespace"] == "default"  # type: ignore[index]
    assert role["rules"] == [{"apiGroups": ["discovery.k8s.io"],
                              "resources": ["endpointslices"], "verbs": ["list", "watch"]}]
    binding = objs[("RoleBinding", "mini-proxy")]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "mini-proxy"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "mini-proxy",
                                    "namespace": "default"}]
    assert objs[("ServiceAccount", "mini-proxy")]["automountServiceAccountToken"] is False
    pod = objs[("Deployment", "mini-proxy")]["spec"]["template"]["spec"]  # type: ignore[index]
    assert pod["serviceAccountName"] == "mini-proxy"
    assert pod["automountServiceAccountToken"] is True


def test_without_discovery_no_role_no_token_no_config_section() -> None:
    objs = _objects(minimal_body())
    assert not {kind for kind, _ in objs} & {"Role", "RoleBinding"}
    pod = objs[("Deployment", "mini-proxy")]["spec"]["template"]["spec"]  # type: ignore[index]
    assert pod["automountServiceAccountToken"] is False
    text = objs[("ConfigMap", "mini-proxy")]["data"]["config.yaml"]  # type: ignore[index]
    assert "discovery" not in yaml.safe_load(text)  # existing pods keep their config hash


def test_egress_reaches_the_api_server_and_the_discovered_ports() -> None:
    policy = _objects(discovery_body())[("NetworkPolicy", "mini-proxy")]
    apiserver = Peer("default", ip="10.96.0.1")
    assert allowed(policy, "egress", apiserver, 443)
    assert allowed(policy, "egress", Peer("", ip="172.18.0.2"), 6443)  # after the DNAT
    pod = Peer("default", {"app": "vllm-h100"}, "10.244.1.7")
    assert allowed(policy, "egress", pod, "http")  # type: ignore[arg-type]
    assert allowed(policy, "egress", pod, 8000)
    assert not allowed(policy, "egress", pod, 9000)
    without = _objects(minimal_body())[("NetworkPolicy", "mini-proxy")]
    assert not allowed(without, "egress", apiserver, 6443)


def test_proxy_config_watches_the_cluster_namespace() -> None:
    config = ProxyConfig.model_validate(build_proxy_config(cluster(discovery_body())))
    assert config.discovery.namespace == "default"
    h100, l4 = config.discovery.sources
    assert (h100.name, h100.label_selector, h100.port) == (
        "h100", "kubernetes.io/service-name=vllm-h100", "http")
    assert (l4.label_selector, l4.port, l4.scheme, l4.health_path) == (
        "app=vllm-l4,tier=gpu", 8000, "https", "/v1/models")
