"""Node tuning is the platform's, never a tenant's: no GpuProxyCluster (old fields included)
makes the operator build a privileged or host-network pod, the DaemonSet an older operator
created is deleted, legacy fields are reported, and the proxy pods set only safe per-netns
sysctls themselves."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from tests.operator.clusters import (
    CREDENTIALS,
    by_key,
    cluster,
    minimal_body,
    pod_templates,
    production_body,
)

from gpuproxy_operator import reconcile, status
from gpuproxy_operator.builders import BuildInputs, build_all
from gpuproxy_operator.builders.common import owner_reference
from gpuproxy_operator.sysctls import (
    GUIDE_SYSCTLS,
    HOST_WIDE_SYSCTLS,
    NODE_TUNING_SYSCTLS,
    PER_NETNS_SYSCTLS,
    SAFE_POD_SYSCTLS,
)

# What an older CRD stored in every cluster (its defaults), plus what users set then.
LEGACY_NODE_TUNING: dict[str, Any] = {
    "enabled": True,
    "image": "attacker.example/rootkit:1",
    "sysctls": {**GUIDE_SYSCTLS, "kernel.core_pattern": "|/tmp/x"},
    "nodeSelector": {"node-role/proxy": "true"},
    "tolerations": [{"operator": "Exists"}],
}


def legacy_body(base: dict[str, Any]) -> dict[str, Any]:
    body = copy.deepcopy(base)
    body["spec"]["nodeTuning"] = copy.deepcopy(LEGACY_NODE_TUNING)
    return body


@pytest.mark.parametrize("make", [minimal_body, production_body])
def test_no_cluster_makes_the_operator_build_a_privileged_or_host_pod(make: Any) -> None:
    manifests = build_all(cluster(legacy_body(make())), BuildInputs(CREDENTIALS))
    assert not [m for m in manifests if m["kind"] == "DaemonSet"]
    for manifest in manifests:
        for template in pod_templates(manifest):
            pod = template["spec"]
            assert not pod.get("hostNetwork"), manifest["kind"]
            assert not pod.get("hostPID"), manifest["kind"]
            for c in pod.get("initContainers", []) + pod["containers"]:
                assert c["securityContext"]["privileged"] is False, c["name"]
                assert c["securityContext"]["runAsNonRoot"] is True, c["name"]
                assert "attacker" not in c["image"]


def test_the_daemonset_an_older_operator_created_is_deleted() -> None:
    """Its owner reference makes it ours: reconcile deletes it (and its ConfigMap) as no
    longer wanted, also for a cluster that still asks for node tuning."""
    parsed = cluster(legacy_body(production_body()))
    owner = owner_reference(parsed)
    observed = {
        ("DaemonSet", "prod-node-tuning"): {"kind": "DaemonSet", "metadata": {
            "name": "prod-node-tuning", "ownerReferences": [owner]}},
        ("ConfigMap", "prod-node-tuning"): {"kind": "ConfigMap", "metadata": {
            "name": "prod-node-tuning", "ownerReferences": [owner]}},
    }
    plan = reconcile.plan(build_all(parsed, BuildInputs(CREDENTIALS)), observed,
                          parsed.metadata.uid)
    deleted = {(a.kind, a.name) for a in plan.actions if a.verb == "delete"}
    assert deleted == set(observed)


def _node_tuning_condition(body: dict[str, Any], installed: str | None) -> dict[str, Any]:
    parsed = cluster(body)
    obs = status.Observation(1, cluster=parsed, node_tuning=installed)
    new = status.compute_status({}, obs, "2026-01-01T00:00:00Z")
    return {c["type"]: c for c in new["conditions"]}["NodeTuningReady"]


def test_legacy_fields_are_accepted_and_named_in_a_warning() -> None:
    """Not an error: an older CRD defaulted image and sysctls into every stored cluster, so
    refusing them would make every existing cluster invalid on upgrade."""
    cond = _node_tuning_condition(legacy_body(minimal_body()), "ops/gp-node-tuning")
    assert cond["status"] == "True"
    for field in ("image", "sysctls", "nodeSelector", "tolerations"):
        assert f"spec.nodeTuning.{field}" in cond["message"]
    assert "remove them" in cond["message"]
    clean = _node_tuning_condition(minimal_body(), "ops/gp-node-tuning")
    assert "ignored" not in clean["message"]
    assert clean["reason"] == "ProvidedByPlatform"


def test_a_request_without_platform_tuning_is_reported_but_never_holds_ready() -> None:
    body = minimal_body()
    cond = _node_tuning_condition(body, None)
    assert (cond["status"], cond["reason"]) == ("False", "NotInstalled")
    assert "nodeTuning.enabled=true" in cond["message"]
    parsed = cluster(body)
    ready = {"status": {"readyReplicas": 1, "updatedReplicas": 1, "replicas": 1}}
    children: dict[tuple[str, str], Any] = {
        (kind, name): {"kind": kind, "spec": {"replicas": 1}, **ready}
        for kind, name in (("Deployment", "mini-proxy"), ("Deployment", "mini-pgbouncer"),
                           ("StatefulSet", "mini-redis"))}
    obs = status.Observation(1, cluster=parsed, children=children)
    conds = {c["type"]: c for c in status.compute_status({}, obs, "t")["conditions"]}
    assert conds["NodeTuningReady"]["status"] == "False"
    assert conds["Ready"]["status"] == "True"


def test_proxy_pods_set_only_safe_per_netns_sysctls_at_the_guides_values() -> None:
    body = legacy_body(production_body())
    body["spec"]["nodeTuning"]["sysctls"]["net.ipv4.tcp_fin_timeout"] = "99"
    dep = by_key(build_all(cluster(body), BuildInputs(CREDENTIALS)))[("Deployment", "prod-proxy")]
    sysctls = dep["spec"]["template"]["spec"]["securityContext"]["sysctls"]
    assert {s["name"]: s["value"] for s in sysctls} == {k: GUIDE_SYSCTLS[k]
                                                        for k in SAFE_POD_SYSCTLS}


def test_every_allowed_sysctl_is_classified_per_netns_or_host_wide() -> None:
    assert set(NODE_TUNING_SYSCTLS) == PER_NETNS_SYSCTLS | HOST_WIDE_SYSCTLS
    assert not PER_NETNS_SYSCTLS & HOST_WIDE_SYSCTLS
    assert set(SAFE_POD_SYSCTLS) <= PER_NETNS_SYSCTLS
    assert {"net.core.somaxconn", "net.ipv4.ip_local_port_range"} <= PER_NETNS_SYSCTLS
    assert {"fs.file-max", "fs.nr_open", "net.core.rmem_max"} <= HOST_WIDE_SYSCTLS
    assert all(k.startswith("net.ipv4.tcp_") for k in PER_NETNS_SYSCTLS
               if k.startswith("net.ipv4.") and k != "net.ipv4.ip_local_port_range")
