"""The planner against bodies as a real kube-apiserver (1.30) returns them: server-side defaults
and canonical quantities are not drift, removed map keys are nulled, immutable fields are
replaced rather than patched into a 422 forever, and Secret data never leaks into annotations."""

from __future__ import annotations

import copy
import json
from typing import Any

from gpuproxy_operator.api.cluster import parse_cluster
from gpuproxy_operator.builders import BuildInputs, DatabaseCredentials, build_all
from gpuproxy_operator.naming import LAST_APPLIED_ANNOTATION
from gpuproxy_operator.reconcile import (
    Action,
    contains,
    immutable_changes,
    key_of,
    not_kept,
    plan,
)
from tests.reconcile.conftest import cluster_body

PROXY = ("Deployment", "demo-proxy")
REDIS = ("StatefulSet", "demo-redis")
PASSWORD = "pw-that-must-not-leak"

# What kube-apiserver stores for the quantities users write (resource.Quantity canonical form).
CANONICAL = {"0.5": "500m", "1024Mi": "1Gi", "2048Mi": "2Gi", "1000m": "1", "0.25": "250m",
             "1.5Gi": "1536Mi"}


def manifests(**spec: Any) -> tuple[str, list[dict[str, Any]]]:
    body = cluster_body(**spec)
    body["metadata"]["uid"] = "uid-real"
    cluster = parse_cluster(body)
    return cluster.metadata.uid, build_all(cluster,
                                           BuildInputs(DatabaseCredentials("app", PASSWORD)))


def _container(c: dict[str, Any], host_network: bool) -> None:
    c.setdefault("terminationMessagePath", "/dev/termination-log")
    c.setdefault("terminationMessagePolicy", "File")
    c.setdefault("imagePullPolicy", "IfNotPresent")
    for port in c.get("ports", []):
        port.setdefault("protocol", "TCP")
        if host_network:
            port.setdefault("hostPort", port["containerPort"])
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        if probe in c:
            p = c[probe]
            p.setdefault("successThreshold", 1)
            p.setdefault("timeoutSeconds", 1)
            p.setdefault("periodSeconds", 10)
            p.setdefault("failureThreshold", 3)
            if "httpGet" in p:
                p["httpGet"].setdefault("scheme", "HTTP")
    res = c.get("resources", {})
    for group in ("requests", "limits"):
        for name, amount in res.get(group, {}).items():
            res[group][name] = CANONICAL.get(amount, amount)
    if "limits" in res and "requests" not in res:
        res["requests"] = dict(res["limits"])  # requests default to limits
    for mount in c.get("volumeMounts", []):
        if mount.get("readOnly") is False:
            del mount["readOnly"]  # a plain bool with omitempty
    for env in c.get("env", []):
        if "fieldRef" in env.get("valueFrom", {}):
            env["valueFrom"]["fieldRef"].setdefault("apiVersion", "v1")


def _pod_template(template: dict[str, Any]) -> None:
    template["metadata"]["creationTimestamp"] = None
    spec = template["spec"]
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("securityContext", {})
    if "serviceAccountName" in spec:
        spec["serviceAccount"] = spec["serviceAccountName"]
    for c in spec.get("initContainers", []) + spec["containers"]:
        _container(c, bool(spec.get("hostNetwork")))
    for vol in spec.get("volumes", []):
        for source in ("configMap", "secret"):
            if source in vol:
                vol[source].setdefault("defaultMode", 420)
        if "emptyDir" in vol and "sizeLimit" in vol["emptyDir"]:
            size = vol["emptyDir"]["sizeLimit"]
            vol["emptyDir"]["sizeLimit"] = CANONICAL.get(size, size)


def apiserver_returned(manifest: dict[str, Any], rv: int = 7) -> dict[str, Any]:
    """`manifest` after create/patch and a GET, modelled on kube-apiserver 1.30 output."""
    obj = copy.deepcopy(manifest)
    meta = obj["metadata"]
    meta.update(uid=f"uid-{meta['name']}", resourceVersion=str(rv), generation=2,
                creationTimestamp="2026-11-29T10:00:00Z",
                managedFields=[{"manager": "gpuproxy-operator", "operation": "Update"}])
    if not meta.get("annotations"):
        meta.pop("annotations", None)
    kind, spec = obj["kind"], obj.get("spec", {})
    if kind == "Deployment":
        meta.setdefault("annotations", {})["deployment.kubernetes.io/revision"] = "2"
        spec.setdefault("progressDeadlineSeconds", 600)
        spec.setdefault("revisionHistoryLimit", 10)
        _pod_template(spec["template"])
        obj["status"] = {"observedGeneration": 2, "replicas": spec.get("replicas", 1)}
    elif kind == "StatefulSet":
        spec.setdefault("podManagementPolicy", "OrderedReady")
        spec.setdefault("revisionHistoryLimit", 10)
        spec["updateStrategy"].setdefault("rollingUpdate", {"partition": 0})
        spec.setdefault("persistentVolumeClaimRetentionPolicy",
                        {"whenDeleted": "Retain", "whenScaled": "Retain"})
        for claim in spec.get("volumeClaimTemplates", []):
            claim.update(apiVersion="v1", kind="PersistentVolumeClaim")
            claim["metadata"]["creationTimestamp"] = None
            claim["spec"].setdefault("volumeMode", "Filesystem")
            claim["status"] = {"phase": "Pending"}
        _pod_template(spec["template"])
    elif kind == "DaemonSet":
        spec.setdefault("revisionHistoryLimit", 10)
        spec["updateStrategy"].setdefault("rollingUpdate", {}).setdefault("maxSurge", 0)
        _pod_template(spec["template"])
    elif kind == "Service":
        headless = spec.get("clusterIP") == "None"
        spec.setdefault("clusterIP", "10.96.12.34")
        spec["clusterIPs"] = [spec["clusterIP"]]
        spec.update(ipFamilies=["IPv4"], ipFamilyPolicy="SingleStack")
        spec.setdefault("sessionAffinity", "None")
        spec.setdefault("internalTrafficPolicy", "Cluster")
        for port in spec["ports"]:
            port.setdefault("targetPort", port["port"])
            if spec.get("type") in ("NodePort", "LoadBalancer"):
                port.setdefault("nodePort", 31234)
        if spec.get("type") == "LoadBalancer":
            spec.setdefault("allocateLoadBalancerNodePorts", True)
            spec.setdefault("externalTrafficPolicy", "Cluster")
            if spec["externalTrafficPolicy"] == "Local":
                spec.setdefault("healthCheckNodePort", 32100)
        obj["status"] = {"loadBalancer": {}}
        assert headless == (spec["clusterIP"] == "None")
    elif kind == "Secret":
        obj.setdefault("type", "Opaque")
    elif kind == "NetworkPolicy":
        for rule in spec.get("ingress", []) + spec.get("egress", []):
            for port in rule.get("ports", []):
                port.setdefault("protocol", "TCP")
        for direction in ("ingress", "egress"):
            if spec.get(direction) == []:
                del spec[direction]  # omitempty
    elif kind == "PodDisruptionBudget":
        obj["status"] = {"currentHealthy": 0, "desiredHealthy": 0, "disruptionsAllowed": 0,
                         "expectedPods": 0, "observedGeneration": 2}
    return obj


def applied(actions: list[Action]) -> dict[tuple[str, str], dict[str, Any]]:
    """What the server holds after the creates of `actions`."""
    return {a.key: apiserver_returned(a.body) for a in actions if a.verb == "create"}


def production_spec() -> dict[str, Any]:
    return {
        "proxy": {
            "replicas": 3,
            "backends": [{"name": "vllm-0", "url": "http://vllm-0.gpu.svc:8000"}],
            "resources": {"requests": {"cpu": "0.5", "memory": "1024Mi"},
                          "limits": {"cpu": "1000m", "memory": "2048Mi"}},
            "nodeSelector": {"pool": "edge", "zone": "a"},
            "service": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                        "annotations": {"lb.example/internal": "true"}},
        },
        "database": {"host": "pg.db.svc", "credentialsSecret": "db-creds"},
        "redis": {"persistence": True, "storageSize": "20Gi",
                  "resources": {"requests": {"cpu": "0.25", "memory": "1.5Gi"}}},
        "pgbouncer": {"resources": {"limits": {"cpu": "0.5", "memory": "1024Mi"}}},
        "nodeTuning": {"enabled": True},
        "monitoring": {"prometheusRule": {"enabled": True}},
    }


def converged(spec: dict[str, Any]) -> tuple[str, list[dict[str, Any]],
                                              dict[tuple[str, str], dict[str, Any]]]:
    uid, desired = manifests(**spec)
    return uid, desired, applied(plan(desired, {}, uid, replicas_key=PROXY).actions)


def test_server_defaulted_and_canonicalised_children_need_no_write() -> None:
    uid, desired, observed = converged(production_spec())
    assert len(observed) == len(desired)
    assert observed[PROXY]["spec"]["template"]["spec"]["containers"][0]["resources"] == {
        "requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "2Gi"}}
    assert not plan(desired, observed, uid, replicas_key=PROXY, reconciled_before=True)


def test_integral_floats_come_back_as_ints_without_drift() -> None:
    # A custom resource's 1.0 is decoded by Go and written back as 1; True is still not 1.
    assert contains({"threshold": 1, "ratio": 0.5}, {"threshold": 1.0, "ratio": 0.5})
    assert not contains({"threshold": 2}, {"threshold": 1.0})
    assert not contains({"on": 1}, {"on": True})


def _patch_for(spec: dict[str, Any], key: tuple[str, str]) -> dict[str, Any]:
    uid, _, observed = converged(production_spec())
    _, desired = manifests(**spec)
    [action] = [a for a in plan(desired, observed, uid, replicas_key=PROXY).actions
                if a.key == key]
    assert action.verb == "patch"
    return action.body


def test_removed_node_selector_entry_and_annotations_are_nulled() -> None:
    spec = production_spec()
    spec["proxy"] = {**spec["proxy"], "nodeSelector": {"pool": "edge"}}
    pod = _patch_for(spec, PROXY)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "edge", "zone": None}

    spec = production_spec()
    spec["proxy"] = {**spec["proxy"], "service": {"type": "LoadBalancer",
                                                  "externalTrafficPolicy": "Local"}}
    meta = _patch_for(spec, ("Service", "demo-proxy"))["metadata"]
    assert meta["annotations"]["lb.example/internal"] is None


def test_patch_nulls_only_what_we_applied_and_records_the_new_body() -> None:
    uid, _, observed = converged(production_spec())
    # Someone else's annotation (kubectl rollout restart) is not ours to remove.
    live = observed[PROXY]
    live["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"] = "x"
    spec = production_spec()
    spec["proxy"] = {**spec["proxy"], "nodeSelector": {}}
    _, desired = manifests(**spec)
    [action] = [a for a in plan(desired, observed, uid, replicas_key=PROXY).actions
                if a.key == PROXY]
    template = action.body["spec"]["template"]
    assert template["spec"]["nodeSelector"] is None
    assert "kubectl.kubernetes.io/restartedAt" not in template["metadata"]["annotations"]
    assert "replicas" not in json.loads(action.body["metadata"]["annotations"][
        LAST_APPLIED_ANNOTATION])["spec"]  # the autoscaler's, not ours to record


def test_secret_data_never_reaches_the_last_applied_annotation() -> None:
    _, _, observed = converged(production_spec())
    secret = observed[("Secret", "demo-pgbouncer")]
    assert secret["data"]
    for obj in observed.values():
        text = obj["metadata"]["annotations"][LAST_APPLIED_ANNOTATION]
        assert "data" not in json.loads(text)
        assert PASSWORD not in text


def test_toggling_redis_persistence_replaces_the_statefulset() -> None:
    uid, _, observed = converged(production_spec())
    spec = production_spec()
    spec["redis"] = {**spec["redis"], "persistence": False}
    _, desired = manifests(**spec)
    actions = {a.key: a for a in plan(desired, observed, uid, replicas_key=PROXY).actions}
    action = actions[REDIS]
    assert (action.verb, action.reason) == ("replace", "Replaced")
    assert "spec.volumeClaimTemplates" in action.detail
    assert "volumeClaimTemplates" not in action.body["spec"]
    assert LAST_APPLIED_ANNOTATION in action.body["metadata"]["annotations"]


def test_storage_size_change_replaces_and_says_the_claim_is_kept() -> None:
    uid, _, observed = converged(production_spec())
    spec = production_spec()
    spec["redis"] = {**spec["redis"], "storageSize": "50Gi"}
    _, desired = manifests(**spec)
    [action] = [a for a in plan(desired, observed, uid, replicas_key=PROXY).actions
                if a.key == REDIS]
    assert action.verb == "replace"
    assert "PersistentVolumeClaims are kept" in action.detail


def test_immutable_fields_of_each_kind() -> None:
    _, desired = manifests(**production_spec())
    by_key = {key_of(m): m for m in desired}
    sts = by_key[REDIS]
    live = apiserver_returned(sts)
    assert immutable_changes(sts, live) == []
    assert immutable_changes(sts, {**live, "spec": {**live["spec"], "serviceName": "x"}}) == [
        "spec.serviceName"]
    assert immutable_changes(sts, {**live, "spec": {**live["spec"],
                                                    "podManagementPolicy": "Parallel"}}) == []
    dep = by_key[PROXY]
    moved = copy.deepcopy(apiserver_returned(dep))
    moved["spec"]["selector"]["matchLabels"]["extra"] = "1"
    assert immutable_changes(dep, moved) == ["spec.selector"]
    headless = by_key[("Service", "demo-redis-headless")]
    client = by_key[("Service", "demo-redis")]
    assert immutable_changes(headless, apiserver_returned(headless)) == []
    assert immutable_changes(client, apiserver_returned(client)) == []  # allocated IP
    assert immutable_changes(headless, apiserver_returned(client)) == ["spec.clusterIP"]
    assert immutable_changes(client, apiserver_returned(headless)) == ["spec.clusterIP"]


def test_server_answers_keep_everything_we_wrote() -> None:
    _, desired = manifests(**production_spec())
    for m in desired:
        assert not_kept(apiserver_returned(m), m) == [], key_of(m)
    dep = next(m for m in desired if key_of(m) == PROXY)
    dropped = apiserver_returned(dep)
    del dropped["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    assert not_kept(dropped, dep) == ["spec.template.spec.containers[0].startupProbe"]
