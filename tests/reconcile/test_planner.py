"""The pure planner: create what is missing, patch only what differs, never touch the rest."""

from __future__ import annotations

import copy
from typing import Any

from gpuproxy_operator.api.cluster import parse_cluster
from gpuproxy_operator.builders import BuildInputs, DatabaseCredentials, build_all
from gpuproxy_operator.reconcile import contains, key_of, merge_patch, plan
from tests.reconcile.conftest import cluster_body

PROXY = ("Deployment", "demo-proxy")


def manifests(**spec: Any) -> tuple[str, list[dict[str, Any]]]:
    body = cluster_body(**spec)
    body["metadata"]["uid"] = "uid-planner"
    cluster = parse_cluster(body)
    return cluster.metadata.uid, build_all(cluster, BuildInputs(DatabaseCredentials("u", "p")))


def as_observed(desired: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """What an API server returns: our bodies plus defaults and status."""
    out = {}
    for m in desired:
        obj = copy.deepcopy(m)
        obj["metadata"].update(uid="x", resourceVersion="7", creationTimestamp="2026-01-01T00:00Z")
        obj["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = "3"
        if obj["kind"] == "Deployment":
            obj["spec"]["progressDeadlineSeconds"] = 600
            obj["status"] = {"readyReplicas": 1}
        out[key_of(obj)] = obj
    return out


def test_nothing_observed_creates_everything_in_order() -> None:
    uid, desired = manifests()
    actions = plan(desired, {}, uid).actions
    assert [(a.verb, a.key) for a in actions] == [("create", key_of(m)) for m in desired]
    assert {a.reason for a in actions} == {"Created"}


def test_converged_children_with_server_defaults_need_no_action() -> None:
    uid, desired = manifests()
    assert not plan(desired, as_observed(desired), uid, replicas_key=PROXY)


def test_spec_change_patches_only_children_whose_hash_differs() -> None:
    uid, before = manifests()
    _, after = manifests(proxy={"replicas": 2, "backends": [
        {"name": "vllm-0", "url": "http://vllm-0.gpu.svc:8000"},
        {"name": "vllm-1", "url": "http://vllm-1.gpu.svc:8000"}]})
    actions = plan(after, as_observed(before), uid, replicas_key=PROXY).actions
    # The proxy reloads backends from its ConfigMap: its pod template stays as it was.
    assert {a.key for a in actions} == {("ConfigMap", "demo-proxy")}
    assert {(a.verb, a.reason) for a in actions} == {("patch", "Updated")}


def test_out_of_band_edit_with_the_same_hash_is_repaired() -> None:
    uid, desired = manifests()
    observed = as_observed(desired)
    observed[("ConfigMap", "demo-proxy")]["data"] = {"config.yaml": "edited", "extra": "x"}
    [action] = plan(desired, observed, uid, reconciled_before=True).actions
    assert (action.verb, action.reason, action.key) == ("patch", "Repaired", ("ConfigMap",
                                                                              "demo-proxy"))
    assert action.body["data"]["extra"] is None  # keys we no longer render are removed


def test_missing_child_after_a_reconcile_is_a_repair() -> None:
    uid, desired = manifests()
    observed = as_observed(desired)
    del observed[("Service", "demo-redis")]
    [action] = plan(desired, observed, uid, reconciled_before=True).actions
    assert (action.verb, action.reason) == ("create", "Repaired")


def test_proxy_replicas_are_compared_on_their_own() -> None:
    uid, desired = manifests()
    observed = as_observed(desired)
    observed[PROXY]["spec"]["replicas"] = 9
    [action] = plan(desired, observed, uid, replicas_key=PROXY).actions
    assert action.body == {"spec": {"replicas": 2}}
    assert action.reason == "Scaled"


def test_children_no_longer_wanted_are_deleted_only_when_we_control_them() -> None:
    uid, desired = manifests()
    observed = as_observed(desired)
    ours = copy.deepcopy(observed[("ConfigMap", "demo-redis")])
    ours["metadata"]["name"] = "demo-old"
    theirs = copy.deepcopy(ours)
    theirs["metadata"]["name"] = "someone-else"
    theirs["metadata"]["ownerReferences"] = [{"uid": "other", "controller": True}]
    observed[key_of(ours)] = ours
    observed[key_of(theirs)] = theirs
    actions = plan(desired, observed, uid).actions
    assert [(a.verb, a.key) for a in actions] == [("delete", ("ConfigMap", "demo-old"))]


def test_contains_tolerates_canonical_quantities_and_server_defaults() -> None:
    want = {"resources": {"requests": {"cpu": "0.5", "memory": "1024Mi"}}, "ports": [{"port": 80}]}
    have = {"resources": {"requests": {"cpu": "500m", "memory": "1Gi"}},
            "ports": [{"port": 80, "protocol": "TCP"}], "extra": 1}
    assert contains(have, want)
    assert not contains({**have, "ports": []}, want)
    assert not contains({"resources": {"requests": {"cpu": "1", "memory": "1Gi"}},
                         "ports": [{"port": 80}]}, want)
    assert not contains({"a": "1"}, {"a": 1})  # a string is not an int
    # Fields the API server omits when empty or zero are not drift; non-zero ones are.
    assert contains({"spec": {}}, {"spec": {"nodeSelector": {}, "tolerations": [],
                                            "minReadySeconds": 0, "hostNetwork": False}})
    assert not contains({"spec": {}}, {"spec": {"minReadySeconds": 5}})


def test_merge_patch_carries_metadata_and_content_not_status() -> None:
    _, desired = manifests()
    dep = next(m for m in desired if key_of(m) == PROXY)
    patch = merge_patch(dep, as_observed(desired)[PROXY])
    assert set(patch) == {"metadata", "spec"}
    assert set(patch["metadata"]) == {"labels", "annotations", "ownerReferences"}
