"""Properties every child shares: metadata, owner reference, hardened pods, determinism,
hash annotations, apply order, and no objects for components that are off."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml
from tests.operator.clusters import (
    CREDENTIALS,
    all_manifests,
    by_key,
    cluster,
    lean_body,
    minimal_body,
    pod_templates,
    production_body,
)

from gpuproxy_operator.builders import BuildInputs, build_all
from gpuproxy_operator.builders.common import Manifest
from gpuproxy_operator.naming import CONFIG_HASH_ANNOTATION, SPEC_HASH_ANNOTATION

ALL = all_manifests()
EVERY_CHILD = [(f"{n}/{m['kind']}/{m['metadata']['name']}", m) for n, ms in ALL.items() for m in ms]
IDS = [i for i, _ in EVERY_CHILD]


def _dump(manifests: list[Manifest]) -> str:
    return yaml.safe_dump_all(manifests, sort_keys=False)


@pytest.mark.parametrize("item", EVERY_CHILD, ids=IDS)
def test_every_child_has_namespace_labels_owner_and_spec_hash(item: tuple[str, Manifest]) -> None:
    _, m = item
    meta = m["metadata"]
    instance = meta["labels"]["app.kubernetes.io/instance"]
    assert meta["namespace"]
    assert meta["name"].startswith(f"{instance}-")
    for key in ("name", "instance", "component", "part-of", "managed-by", "version"):
        assert meta["labels"][f"app.kubernetes.io/{key}"]
    assert meta["labels"]["gpuproxy.aiserve.farm/cluster"] == instance
    [owner] = meta["ownerReferences"]
    assert owner["apiVersion"] == "gpuproxy.aiserve.farm/v1alpha1"
    assert owner["kind"] == "GpuProxyCluster"
    assert owner["name"] == instance
    assert owner["uid"] == f"uid-{instance}" or owner["uid"] == ""
    assert owner["controller"] is True
    assert owner["blockOwnerDeletion"] is True
    assert len(meta["annotations"][SPEC_HASH_ANNOTATION]) == 64


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


WORKLOADS = [(i, m) for i, m in EVERY_CHILD if pod_templates(m)]


@pytest.mark.parametrize("item", WORKLOADS, ids=[i for i, _ in WORKLOADS])
def test_every_pod_is_hardened_and_has_probes_and_resources(item: tuple[str, Manifest]) -> None:
    _, m = item
    [template] = pod_templates(m)
    pod = template["spec"]
    assert template["metadata"]["labels"] == m["metadata"]["labels"]
    assert len(template["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]) == 64
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    # A token only for the proxy's own EndpointSlice watch (backend discovery).
    discovers = m["metadata"]["name"].endswith("-proxy") and pod["serviceAccountName"] \
        and item[0].startswith("discovery/")
    assert pod["automountServiceAccountToken"] is bool(discovers)
    # No docker-link env vars: a Service named like `gpuproxy-*` must not leak GPUPROXY_* env.
    assert pod["enableServiceLinks"] is False
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["privileged"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["runAsNonRoot"] is True
        assert sc["runAsUser"] > 0
        assert c["readinessProbe"]
        assert c["livenessProbe"]
    for c in _containers(pod):
        assert c["resources"]["requests"]
        assert c["resources"]["limits"]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True


def test_no_child_runs_a_privileged_container() -> None:
    """Node tuning, the one privileged workload, is the platform's (the chart's DaemonSet)."""
    privileged = [
        (m["kind"], c["name"])
        for ms in ALL.values() for m in ms for t in pod_templates(m)
        for c in _containers(t["spec"]) if c["securityContext"].get("privileged")
    ]
    assert privileged == []


def test_same_input_gives_byte_identical_yaml() -> None:
    first = _dump(build_all(cluster(production_body()), BuildInputs(CREDENTIALS, 5)))
    second = _dump(build_all(cluster(production_body()), BuildInputs(CREDENTIALS, 5)))
    assert first == second
    assert "&id" not in first  # no shared sub-objects printed as YAML anchors


def _reversed(mapping: dict[str, Any]) -> dict[str, Any]:
    return dict(reversed(list(mapping.items())))


def test_map_order_in_the_spec_does_not_change_the_output() -> None:
    body = production_body()
    spec = body["spec"]
    spec["proxy"]["networkPolicy"] = {"metricsFrom": [{"podSelector": {"a": "1", "b": "2"}}]}
    spec["proxy"]["service"]["annotations"] = {"a": "1", "b": "2", "c": "3"}
    spec["proxy"]["podAnnotations"] = {"a": "1", "b": "2"}
    spec["proxy"]["nodeSelector"] = {"a": "1", "b": "2"}
    spec["proxy"]["resources"] = {"requests": {"cpu": "1", "memory": "1Gi"},
                                  "limits": {"cpu": "2", "memory": "2Gi"}}
    spec["monitoring"]["prometheusRule"]["labels"] = {"a": "1", "b": "2"}
    reordered = copy.deepcopy(body)
    rspec = reordered["spec"]
    peer = rspec["proxy"]["networkPolicy"]["metricsFrom"][0]
    peer["podSelector"] = _reversed(peer["podSelector"])
    rspec["proxy"]["service"]["annotations"] = _reversed(rspec["proxy"]["service"]["annotations"])
    rspec["proxy"]["podAnnotations"] = _reversed(rspec["proxy"]["podAnnotations"])
    rspec["proxy"]["nodeSelector"] = _reversed(rspec["proxy"]["nodeSelector"])
    rspec["proxy"]["resources"]["requests"] = _reversed(rspec["proxy"]["resources"]["requests"])
    rspec["monitoring"]["prometheusRule"]["labels"] = _reversed(
        rspec["monitoring"]["prometheusRule"]["labels"]
    )
    assert _dump(build_all(cluster(body), BuildInputs())) == _dump(
        build_all(cluster(reordered), BuildInputs())
    )


def _template_hash(manifests: list[Manifest], kind: str, name: str) -> str:
    m = by_key(manifests)[(kind, name)]
    return str(m["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION])


@pytest.mark.parametrize(
    ("kind", "name", "field_path", "value", "rolls"),
    [
        ("Deployment", "mini-proxy", ("proxy", "workers"), 8, True),
        # The proxy reloads these from its ConfigMap; PgBouncer gets a SIGHUP.
        ("Deployment", "mini-proxy", ("proxy", "rateLimits"), {"perIp": 50}, False),
        ("Deployment", "mini-pgbouncer", ("pgbouncer", "defaultPoolSize"), 100, False),
        ("StatefulSet", "mini-redis", ("redis", "maxmemory"), "2gb", True),
    ],
)
def test_a_changed_configmap_rolls_only_what_cannot_reload_it(
    kind: str, name: str, field_path: tuple[str, str], value: Any, rolls: bool
) -> None:
    before = build_all(cluster(minimal_body()), BuildInputs())
    body = minimal_body()
    body["spec"].setdefault(field_path[0], {})[field_path[1]] = value
    after = build_all(cluster(body), BuildInputs())
    configmap = ("ConfigMap", name)
    assert by_key(before)[configmap]["data"] != by_key(after)[configmap]["data"]
    changed = _template_hash(before, kind, name) != _template_hash(after, kind, name)
    assert changed is rolls
    if not rolls:
        assert by_key(before)[(kind, name)]["spec"]["template"] == by_key(after)[(kind, name)][
            "spec"]["template"]
    # Never another component's pods.
    others = [(k, n) for (k, n) in by_key(before) if pod_templates(by_key(before)[(k, n)])]
    for other in others:
        if other != (kind, name):
            assert _template_hash(before, *other) == _template_hash(after, *other)


def test_proxy_replicas_are_not_part_of_the_spec_hash() -> None:
    c = cluster(production_body())
    three = by_key(build_all(c, BuildInputs(CREDENTIALS, 3)))[("Deployment", "prod-proxy")]
    nine = by_key(build_all(c, BuildInputs(CREDENTIALS, 9)))[("Deployment", "prod-proxy")]
    assert (three["spec"]["replicas"], nine["spec"]["replicas"]) == (3, 9)
    assert three["metadata"]["annotations"] == nine["metadata"]["annotations"]
    image = production_body()
    image["spec"]["proxy"]["image"] = "registry.example/gpuproxy-proxy:1.2.4"
    other = by_key(build_all(cluster(image), BuildInputs(CREDENTIALS, 3)))
    assert other[("Deployment", "prod-proxy")]["metadata"]["annotations"][
        SPEC_HASH_ANNOTATION
    ] != three["metadata"]["annotations"][SPEC_HASH_ANNOTATION]


def test_apply_order() -> None:
    kinds = [m["kind"] for m in ALL["production-100k"]]
    order = ["ServiceAccount", "ConfigMap", "Secret", "Service", "StatefulSet",
             "Deployment", "PodDisruptionBudget", "NetworkPolicy", "CronJob",
             "PrometheusRule", "ServiceMonitor"]
    assert kinds == sorted(kinds, key=order.index)
    assert set(kinds) == set(order)


def test_disabled_components_produce_no_objects() -> None:
    names = {(m["kind"], m["metadata"]["name"]) for m in ALL["lean"]}
    assert names == {
        ("ServiceAccount", "lean-proxy"),
        ("ConfigMap", "lean-proxy"),
        ("ConfigMap", "lean-pgbouncer"),
        ("Secret", "lean-pgbouncer"),
        ("Service", "lean-proxy"),
        ("Service", "lean-proxy-metrics"),
        ("Service", "lean-pgbouncer"),
        ("Deployment", "lean-pgbouncer"),
        ("Deployment", "lean-proxy"),
        # PgBouncer's budget is not optional: its two pods are what keeps metering up.
        ("PodDisruptionBudget", "lean-pgbouncer"),
        ("NetworkPolicy", "lean-pgbouncer"),
        ("NetworkPolicy", "lean-proxy"),
    }
    assert not [m for m in ALL["lean"] if m["metadata"]["labels"][
        "app.kubernetes.io/component"] in ("redis", "node-tuning", "monitoring")]


def test_no_userlist_secret_without_credentials() -> None:
    kinds = [m["kind"] for m in ALL["minimal"]]
    assert "Secret" not in kinds
    assert "Secret" in [m["kind"] for m in ALL["minimal-with-credentials"]]


def test_lean_variant_really_is_lean() -> None:
    """The fixture itself: every switch it claims to flip is flipped."""
    spec = cluster(lean_body()).spec
    assert spec.redis.mode == "external"
    assert not spec.node_tuning.enabled
    assert not spec.proxy.pod_disruption_budget.enabled
    assert not spec.monitoring.prometheus_rule.enabled
    assert not spec.monitoring.service_monitor.enabled
