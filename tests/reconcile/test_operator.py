"""The real operator against kmock: create, update, drift repair, quiet when converged (also
across a restart), pause, invalid specs, missing optional APIs and Secrets, two namespaces."""

from __future__ import annotations

from typing import Any

import kmock
import pytest

from gpuproxy_operator.api.base import KIND
from gpuproxy_operator.api.cluster import parse_cluster
from gpuproxy_operator.autoscaling.kube_adapter import HPA
from gpuproxy_operator.builders import BuildInputs, DatabaseCredentials, OperandImages, build_all
from gpuproxy_operator.builders.images import with_images
from gpuproxy_operator.builders.redis_auth import (
    build_generated_redis_secret,
    needs_generated_secret,
)
from gpuproxy_operator.naming import CLUSTER_LABEL, CONFIG_HASH_ANNOTATION, SPEC_HASH_ANNOTATION
from gpuproxy_operator.reconcile import contains
from tests.reconcile.conftest import (
    Cluster,
    Operator,
    cluster_body,
    condition,
    eventually,
    secret_body,
)

CREDS = DatabaseCredentials("app", "s3cret")


def desired(body: dict[str, Any], **inputs: Any) -> list[dict[str, Any]]:
    """What reconcile creates: every built child, and the bundled Redis' generated password
    Secret (its random data is not compared)."""
    parsed = parse_cluster(body)
    out = build_all(parsed, BuildInputs(CREDS, **inputs))
    if needs_generated_secret(parsed):
        secret = build_generated_redis_secret(with_images(parsed, OperandImages()), "random")
        out.append({k: v for k, v in secret.items() if k != "data"})
    return out


def replicas(cluster: Cluster, name: str = "demo-proxy") -> int:
    return int(cluster.get("Deployment", "ns1", name)["spec"]["replicas"])


def cr(cluster: Cluster, body: dict[str, Any]) -> dict[str, Any] | None:
    return cluster.find(KIND, body["metadata"]["namespace"], body["metadata"]["name"])


def is_ready(cluster: Cluster, body: dict[str, Any]) -> bool:
    obj = cr(cluster, body)
    return condition(obj, "Ready").get("status") == "True" and (obj or {}).get("status", {}).get(
        "phase") == "Ready"


async def converge(cluster: Cluster, operator: Operator, body: dict[str, Any]) -> None:
    ns = body["metadata"]["namespace"]
    if cluster.find("Secret", ns, "db-creds") is None:
        await cluster.create(secret_body(ns))
    await cluster.create(body)
    if operator.state is None:
        await operator.start()
    await eventually(lambda: is_ready(cluster, body))


def hash_of(obj: dict[str, Any] | None) -> str:
    return str(((obj or {}).get("metadata") or {}).get("annotations", {}).get(SPEC_HASH_ANNOTATION))


async def test_create_builds_every_child_with_owner_refs_and_becomes_ready(
        cluster: Cluster, operator: Operator) -> None:
    cluster.ready = False
    body = cluster_body()
    await cluster.create(secret_body("ns1"))
    await cluster.create(body)
    await operator.start()
    want = desired(body)
    uid = body["metadata"]["uid"]
    await eventually(lambda: len(cluster.children("ns1", uid)) == len(want))
    children = cluster.children("ns1", uid)
    for manifest in want:
        key = (manifest["kind"], manifest["metadata"]["name"])
        assert contains(children[key], manifest), key
        ref = children[key]["metadata"]["ownerReferences"][0]
        assert (ref["uid"], ref["kind"], ref["controller"]) == (uid, KIND, True)
    # Not ready while the fake controllers report no ready pods: Progressing, with a hint.
    await eventually(lambda: condition(cr(cluster, body), "ProxyReady").get("reason") == "NotReady")
    obj = cr(cluster, body)
    assert condition(obj, "Ready")["status"] == "False"
    assert condition(obj, "Progressing")["status"] == "True"
    assert "0/2 pods ready" in condition(obj, "ProxyReady")["message"]
    assert "kubectl -n ns1 get pods -l" in condition(obj, "ProxyReady")["message"]
    cluster.ready = True
    await eventually(lambda: is_ready(cluster, body))
    status = cr(cluster, body)["status"]  # type: ignore[index]
    assert not cr(cluster, body)["metadata"].get("finalizers")  # type: ignore[index]
    assert status["observedGeneration"] == 1
    assert (status["replicas"], status["readyReplicas"]) == (2, 2)
    assert "app.kubernetes.io/component=proxy" in status["selector"]
    assert status["endpoints"]["proxy"].startswith("http://demo-proxy.ns1.svc:")
    assert condition(cr(cluster, body), "Progressing")["status"] == "False"
    def reasons() -> set[tuple[str, str]]:
        return {(e["reason"], e["involvedObject"]["name"]) for e in cluster.events("ns1")}

    await eventually(lambda: {("Created", "demo"), ("Ready", "demo")} <= reasons())
    assert not {r for r, _ in reasons()} & {"ChildAltered", "ChildRejected"}


async def test_spec_change_patches_only_affected_children(
        cluster: Cluster, operator: Operator) -> None:
    body = cluster_body()
    await converge(cluster, operator, body)
    before = {(m["kind"], m["metadata"]["name"]): m for m in desired(body)}
    template_before = cluster.get("Deployment", "ns1", "demo-proxy")["spec"]["template"]
    mark = cluster.mark()
    # The worker count is fixed at process start, so it rolls the pods (a strategy change
    # would reach them through the ConfigMap alone).
    change = {"proxy": {**body["spec"]["proxy"], "workers": 3}}
    await cluster.edit_spec("ns1", "demo", change)
    new_body = {**body, "spec": {**body["spec"], **change}}
    after = {(m["kind"], m["metadata"]["name"]): m for m in desired(new_body)}
    affected = {key for key in after if hash_of(after[key]) != hash_of(before[key])}
    assert ("Deployment", "demo-proxy") in affected
    assert ("ConfigMap", "demo-proxy") in affected

    def proxy_updated() -> bool:
        dep = cluster.get("Deployment", "ns1", "demo-proxy")
        return hash_of(dep) == hash_of(after[("Deployment", "demo-proxy")])

    await eventually(proxy_updated)
    await eventually(lambda: condition(cr(cluster, body), "Ready").get("observedGeneration") == 2)
    template_after = cluster.get("Deployment", "ns1", "demo-proxy")["spec"]["template"]
    annotation = CONFIG_HASH_ANNOTATION
    assert template_after["metadata"]["annotations"][annotation] != \
        template_before["metadata"]["annotations"][annotation]
    child_writes = {w for w in cluster.operator_writes(mark) if KIND.lower() not in w}
    expected = {f"PATCH {cluster.path(kind, 'ns1', name)}" for kind, name in affected}
    assert child_writes == expected
    reasons = {e["reason"] for e in cluster.events("ns1")}
    assert "Updated" in reasons


async def test_out_of_band_delete_and_edit_are_repaired_by_watches(
        cluster: Cluster, operator: Operator) -> None:
    operator.resync_seconds = 3600.0  # repairs must come from the child watches, not a resync
    body = cluster_body()
    await converge(cluster, operator, body)
    want = {(m["kind"], m["metadata"]["name"]): m for m in desired(body)}
    await cluster.delete("ConfigMap", "ns1", "demo-proxy")
    await eventually(lambda: cluster.find("ConfigMap", "ns1", "demo-proxy") is not None)
    assert contains(cluster.get("ConfigMap", "ns1", "demo-proxy"),
                    want[("ConfigMap", "demo-proxy")])
    await cluster.patch("Deployment", "ns1", "demo-pgbouncer", {"spec": {"template": {"spec": {
        "containers": [{"name": "pgbouncer", "image": "evil:latest"}]}}}})
    await eventually(lambda: contains(cluster.get("Deployment", "ns1", "demo-pgbouncer"),
                                      want[("Deployment", "demo-pgbouncer")]))
    def repaired() -> str:
        return " | ".join(e["message"] for e in cluster.events("ns1") if e["reason"] == "Repaired")

    await eventually(lambda: "ConfigMap demo-proxy" in repaired())
    await eventually(lambda: "Deployment demo-pgbouncer" in repaired())


async def test_converged_cluster_makes_zero_writes_across_resyncs_and_restart(
        cluster: Cluster, operator: Operator) -> None:
    body = cluster_body()
    await converge(cluster, operator, body)
    # Let the last status flip (Progressing -> Converged) land before counting.
    await eventually(lambda: condition(cr(cluster, body), "Progressing").get("status") == "False")
    base = operator.reconciles("resync")
    await eventually(lambda: operator.reconciles("resync") >= base + 1)
    mark = cluster.mark()
    await eventually(lambda: operator.reconciles("resync") >= base + 4)
    assert cluster.operator_writes(mark, events=True) == []

    await operator.stop()
    mark = cluster.mark()
    await operator.start()
    await eventually(lambda: operator.reconciles("resync") >= 3 and operator.reconciles() >= 4)
    assert cluster.operator_writes(mark, events=True) == []
    assert is_ready(cluster, body)


async def test_paused_makes_no_child_writes_and_unpausing_converges(
        cluster: Cluster, operator: Operator) -> None:
    body = cluster_body()
    await converge(cluster, operator, body)
    old_hash = hash_of(cluster.get("ConfigMap", "ns1", "demo-proxy"))
    mark = cluster.mark()
    paused_spec = {"paused": True, "proxy": {**body["spec"]["proxy"], "replicas": 4}}
    await cluster.edit_spec("ns1", "demo", paused_spec)
    await eventually(lambda: condition(cr(cluster, body), "Paused").get("status") == "True")
    await cluster.delete("Service", "ns1", "demo-redis")  # not restored while paused
    base = operator.reconciles()
    await eventually(lambda: operator.reconciles() >= base + 3)
    obj = cr(cluster, body)
    assert obj is not None
    assert obj["status"]["phase"] == "Paused"
    assert "change(s) to child objects are on hold" in condition(obj, "Paused")["message"]
    writes = cluster.operator_writes(mark)
    assert all(KIND.lower() in w for w in writes), writes
    assert cluster.get("Deployment", "ns1", "demo-proxy")["spec"]["replicas"] == 2
    assert cluster.find("Service", "ns1", "demo-redis") is None

    await cluster.edit_spec("ns1", "demo", {"paused": False})
    await eventually(lambda: cluster.find("Service", "ns1", "demo-redis") is not None)
    await eventually(lambda: replicas(cluster) == 4)
    await eventually(lambda: condition(cr(cluster, body), "Paused").get("status") == "False")
    await eventually(lambda: is_ready(cluster, body))
    assert hash_of(cluster.get("ConfigMap", "ns1", "demo-proxy")) == old_hash


async def test_invalid_spec_is_degraded_with_field_path_and_builds_nothing(
        cluster: Cluster, operator: Operator) -> None:
    body = cluster_body(autoscaling={"enabled": True, "minReplicas": 5, "maxReplicas": 2})
    await cluster.create(secret_body("ns1"))
    await cluster.create(body)
    await operator.start()
    await eventually(lambda: condition(cr(cluster, body), "Degraded").get("status") == "True")
    obj = cr(cluster, body)
    assert obj is not None
    degraded = condition(obj, "Degraded")
    assert degraded["reason"] == "InvalidSpec"
    assert "spec.autoscaling" in degraded["message"]
    assert "minReplicas must be less than or equal to maxReplicas" in degraded["message"]
    assert obj["status"]["phase"] == "Degraded"
    assert condition(obj, "ProxyReady")["status"] == "Unknown"
    assert cluster.children("ns1", body["metadata"]["uid"]) == {}
    # Not retried in a loop: resyncs keep it Degraded with no further writes.
    base = operator.reconciles("resync")
    await eventually(lambda: operator.reconciles("resync") >= base + 1)
    mark = cluster.mark()
    await eventually(lambda: operator.reconciles("resync") >= base + 4)
    assert cluster.operator_writes(mark, events=True) == []
    warnings = [e for e in cluster.events("ns1") if e["type"] == "Warning"]
    assert any("spec.autoscaling" in e["message"] for e in warnings), warnings
    # Fixing the spec converges.
    await cluster.edit_spec("ns1", "demo", {"autoscaling": {"enabled": False, "minReplicas": 2}})
    await eventually(lambda: is_ready(cluster, body))


async def test_two_clusters_in_two_namespaces_are_independent(
        cluster: Cluster, operator: Operator) -> None:
    one, two = cluster_body("demo", "ns1"), cluster_body("demo", "ns2")
    await converge(cluster, operator, one)
    await converge(cluster, operator, two)
    uid1, uid2 = one["metadata"]["uid"], two["metadata"]["uid"]
    assert set(cluster.children("ns1", uid1)) == set(cluster.children("ns2", uid2))
    assert cluster.children("ns1", uid2) == {}
    assert cluster.children("ns2", uid1) == {}
    # Break one: the other stays Ready and untouched.
    mark = cluster.mark()
    await cluster.edit_spec("ns2", "demo", {"pgbouncer": {"defaultPoolSize": 900,
                                                          "maxDbConnections": 100}})
    await eventually(lambda: condition(cr(cluster, two), "Degraded").get("status") == "True")
    assert is_ready(cluster, one)
    assert not [w for w in cluster.operator_writes(mark) if "/namespaces/ns1/" in w]
    # Deleting one cluster garbage-collects only its children.
    await cluster.delete(KIND, "ns2", "demo")
    assert cr(cluster, two) is None  # no finalizer: deletion never waits for the operator
    await eventually(lambda: cluster.children("ns2", uid2) == {})
    assert len(cluster.children("ns1", uid1)) == len(desired(one))
    assert is_ready(cluster, one)


async def test_missing_credentials_secret_blocks_only_pgbouncer(
        cluster: Cluster, operator: Operator) -> None:
    body = cluster_body()
    await cluster.create(body)
    await operator.start()
    await eventually(lambda: condition(cr(cluster, body), "PgBouncerReady").get("reason")
                     == "CredentialsUnavailable")
    obj = cr(cluster, body)
    message = condition(obj, "PgBouncerReady")["message"]
    assert "Secret ns1/db-creds not found" in message
    assert condition(obj, "Degraded")["status"] == "True"
    await eventually(lambda: cluster.find("Deployment", "ns1", "demo-proxy") is not None)
    assert cluster.find("Secret", "ns1", "demo-pgbouncer") is None  # no userlist without creds
    await cluster.create(secret_body("ns1"))
    await eventually(lambda: cluster.find("Secret", "ns1", "demo-pgbouncer") is not None)
    await eventually(lambda: is_ready(cluster, body))
    assert condition(cr(cluster, body), "Degraded")["status"] == "False"


@pytest.mark.parametrize("monitoring_crds", [False])
async def test_missing_prometheus_operator_skips_alerts_only(
        cluster: Cluster, operator: Operator, monitoring_crds: bool) -> None:
    body = cluster_body(monitoring={"prometheusRule": {"enabled": True}})
    await converge(cluster, operator, body)
    alerts = condition(cr(cluster, body), "AlertsReady")
    assert alerts["status"] == "False"
    assert alerts["reason"] == "PrometheusOperatorMissing"
    assert "monitoring.coreos.com/v1" in alerts["message"]
    assert condition(cr(cluster, body), "Degraded")["status"] == "False"
    kinds = {k for k, _ in cluster.children("ns1", body["metadata"]["uid"])}
    assert "PrometheusRule" not in kinds
    assert "Deployment" in kinds


async def test_prometheus_rule_created_when_the_crd_exists(
        cluster: Cluster, operator: Operator) -> None:
    body = cluster_body(monitoring={"prometheusRule": {"enabled": True}})
    await converge(cluster, operator, body)
    assert cluster.find("PrometheusRule", "ns1", "demo-proxy") is not None or any(
        k == "PrometheusRule" for k, _ in cluster.children("ns1", body["metadata"]["uid"]))
    assert condition(cr(cluster, body), "AlertsReady")["status"] == "True"


def owner(cluster: Cluster, body: dict[str, Any]) -> tuple[Any, Any]:
    status = (cr(cluster, body) or {}).get("status") or {}
    return status.get("replicasOwner"), status.get("handoverSpecReplicas")


async def test_replicas_have_one_owner_and_reconcile_never_writes_the_autoscalers(
        cluster: Cluster, operator: Operator) -> None:
    body = cluster_body()
    proxy = body["spec"]["proxy"]
    await converge(cluster, operator, body)
    assert owner(cluster, body) == ("Spec", None)
    # Autoscaling off: spec.proxy.replicas (what `kubectl scale gpc` writes) is applied alone.
    mark = cluster.mark()
    await cluster.edit_spec("ns1", "demo", {"proxy": {**proxy, "replicas": 3}})
    await eventually(lambda: replicas(cluster) == 3)
    child_writes = [w for w in cluster.operator_writes(mark) if KIND.lower() not in w]
    assert child_writes == [f"PATCH {cluster.path('Deployment', 'ns1', 'demo-proxy')}"]
    await eventually(lambda: any(e["reason"] == "Scaled" for e in cluster.events("ns1")))

    # Autoscaling on: the autoscaler owns the replicas. Reconcile keeps the Deployment's count
    # when the autoscaler scales it, and never applies a (possibly stale) desiredReplicas.
    await cluster.edit_spec("ns1", "demo", {"autoscaling": {"enabled": True, "minReplicas": 2,
                                                           "maxReplicas": 10}})
    await eventually(lambda: owner(cluster, body) == ("Autoscaler", 3))
    await cluster.patch("Deployment", "ns1", "demo-proxy", {"spec": {"replicas": 7}})
    await cluster.patch(KIND, "ns1", "demo", {"status": {"desiredReplicas": 5}})
    base = operator.reconciles()
    await eventually(lambda: operator.reconciles() >= base + 3)
    assert replicas(cluster) == 7
    # `kubectl scale gpc` meanwhile is reported, not silently ignored (and not applied).
    await cluster.edit_spec("ns1", "demo", {"proxy": {**proxy, "replicas": 4}})
    ignored = await eventually(lambda: [e for e in cluster.events("ns1")
                                        if e["reason"] == "ScaleIgnored"])
    assert ignored[0]["type"] == "Warning"
    assert "from 3 to 4" in ignored[0]["message"]
    await eventually(lambda: owner(cluster, body) == ("Autoscaler", 4))
    assert "spec.proxy.replicas (4) is ignored" in cr(cluster, body)["status"][  # type: ignore[index]
        "replicasOwnerMessage"]
    assert replicas(cluster) == 7

    # Autoscaling off again: the Deployment keeps the autoscaler's 7 rather than snapping to
    # the stale 4, until spec.proxy.replicas changes after the switch.
    await cluster.edit_spec("ns1", "demo", {"autoscaling": {"enabled": False, "minReplicas": 2,
                                                           "maxReplicas": 10}})
    await eventually(lambda: owner(cluster, body) == ("Spec", 4))
    base = operator.reconciles()
    await eventually(lambda: operator.reconciles() >= base + 3)
    assert replicas(cluster) == 7
    assert owner(cluster, body) == ("Spec", 4)
    assert any(e["reason"] == "ReplicasOwnerChanged" for e in cluster.events("ns1"))
    await cluster.edit_spec("ns1", "demo", {"proxy": {**proxy, "replicas": 9}})
    await eventually(lambda: replicas(cluster) == 9)
    await eventually(lambda: owner(cluster, body) == ("Spec", None))

    # An HPA (or KEDA's) on the Deployment: left alone, never fought, reported.
    hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
           "metadata": {"name": "keda-hpa-demo", "namespace": "ns1", "resourceVersion": "1"},
           "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment",
                                       "name": "demo-proxy"}, "maxReplicas": 20}}
    async with cluster.server.post(HPA.path("ns1"), json=hpa) as resp:
        assert resp.status < 400, await resp.text()
    await cluster.patch("Deployment", "ns1", "demo-proxy", {"spec": {"replicas": 12}})
    await eventually(lambda: owner(cluster, body) == ("External", 9))
    base = operator.reconciles()
    await eventually(lambda: operator.reconciles() >= base + 3)
    assert replicas(cluster) == 12
    assert "HorizontalPodAutoscaler ns1/keda-hpa-demo" in cr(cluster, body)[  # type: ignore[index]
        "status"]["replicasOwnerMessage"]


async def test_transient_api_errors_are_retried_until_converged(
        cluster: Cluster, operator: Operator, api_server: Any) -> None:
    operator.resync_seconds = 3600.0  # the retry must come from kopf's TemporaryError backoff
    # A write: reads come from the watch caches (kopf's own list retries are its business).
    deployments = api_server[kmock.action.CREATE, kmock.resource("apps", "v1", "deployments")]
    deployments[:4] << 503 << {"kind": "Status", "apiVersion": "v1", "code": 503,
                               "reason": "ServiceUnavailable", "message": "etcd is slow"}
    body = cluster_body()
    await converge(cluster, operator, body)
    assert operator.state is not None
    samples = [s for m in operator.state.metrics.api_calls.collect() for s in m.samples
               if s.name.endswith("_total") and s.labels["code"] == "503"]
    assert samples, "the operator never saw the 503s it should have retried past"


async def test_removed_keys_are_removed_and_immutable_changes_replace_the_child(
        cluster: Cluster, operator: Operator) -> None:
    """A merge patch keeps map keys it does not mention, and a real API server refuses (422)
    a change to a StatefulSet's volumeClaimTemplates: both must still converge."""
    spec = {"proxy": {**cluster_body()["spec"]["proxy"], "nodeSelector": {"pool": "edge",
                                                                          "zone": "a"}},
            "redis": {"persistence": True}}
    body = cluster_body(**spec)
    await converge(cluster, operator, body)
    # kmock assigns no uid: a foreign annotation marks the old object (a patch would keep it).
    await cluster.patch("StatefulSet", "ns1", "demo-redis",
                        {"metadata": {"annotations": {"test/old": "yes"}}})
    assert cluster.get("StatefulSet", "ns1", "demo-redis")["spec"]["volumeClaimTemplates"]
    mark = cluster.mark()
    # (a merge patch of the CR, like `kubectl edit` computes it, nulls the removed key)
    change = {"proxy": {**spec["proxy"], "nodeSelector": {"pool": "edge", "zone": None}},
              "redis": {"persistence": False}}
    await cluster.edit_spec("ns1", "demo", change)

    def pod_spec() -> dict[str, Any]:
        return dict(cluster.get("Deployment", "ns1", "demo-proxy")["spec"]["template"]["spec"])

    await eventually(lambda: pod_spec().get("nodeSelector") == {"pool": "edge"})
    redis = await eventually(lambda: (s := cluster.find("StatefulSet", "ns1", "demo-redis"))
                             and "test/old" not in s["metadata"]["annotations"] and s)
    assert "volumeClaimTemplates" not in redis["spec"]
    writes = cluster.operator_writes(mark)
    path = cluster.path("StatefulSet", "ns1", "demo-redis")
    assert f"DELETE {path}" in writes
    assert f"PATCH {path}" not in writes
    await eventually(lambda: any(e["reason"] == "Replaced" for e in cluster.events("ns1")))


async def test_child_whose_cluster_label_was_removed_is_patched_not_recreated_forever(
        cluster: Cluster, operator: Operator) -> None:
    """Children are listed by the cluster label: without it a child looks missing, and the
    create gets 409 AlreadyExists on every pass unless the operator patches it back."""
    body = cluster_body()
    await converge(cluster, operator, body)
    await cluster.patch("ConfigMap", "ns1", "demo-proxy",
                        {"metadata": {"labels": {CLUSTER_LABEL: None}}})

    def labelled() -> bool:
        labels = cluster.get("ConfigMap", "ns1", "demo-proxy")["metadata"].get("labels", {})
        return labels.get(CLUSTER_LABEL) == "demo"

    await eventually(labelled)
    await eventually(lambda: "labels restored" in " | ".join(
        e["message"] for e in cluster.events("ns1") if e["reason"] == "Repaired"))


async def test_cluster_writes_keep_spec_and_status_apart(cluster: Cluster,
                                                         operator: Operator) -> None:
    """On a real server /status ignores everything but status and the main resource ignores
    status: the operator writes status only to /status and never sends spec or status to the
    main resource (kopf's own annotation patches are metadata only)."""
    body = cluster_body()
    await converge(cluster, operator, body)
    await cluster.edit_spec("ns1", "demo", {"proxy": {**body["spec"]["proxy"], "replicas": 3}})
    await eventually(lambda: (cr(cluster, body) or {}).get("status", {}).get("replicas") == 3)
    cr_path = cluster.path(KIND, "ns1", "demo")
    writes = [r for r in list(cluster.server) if r.method.value in ("PATCH", "PUT", "POST")
              and r.headers.get("User-Agent", "").startswith(("gpuproxy-operator", "kopf/"))
              and r.url.path.startswith(cr_path)]
    status_writes = [r for r in writes if r.url.path == cr_path + "/status"]
    assert status_writes
    for r in status_writes:
        assert set(r.data) <= {"status", "metadata"}, r.data
        assert set(r.data.get("metadata", {})) <= {"resourceVersion"}
    for r in writes:
        if r.url.path == cr_path:
            assert set(r.data) <= {"metadata"}, r.data
