"""One owner of the proxy replicas at a time (pure): who it is, the count reconcile builds the
Deployment with, the handover memory, and the Events for an owner change or an ignored scale."""

from __future__ import annotations

from typing import Any

from gpuproxy_operator.api.cluster import GpuProxyCluster, parse_cluster
from gpuproxy_operator.api.proxy import ProxySpec
from gpuproxy_operator.autoscaling.ownership import (
    Autoscalers,
    descent_pending,
    find_autoscalers,
    resolve,
)

NONE = Autoscalers()
ON_DEPLOYMENT = Autoscalers(on_deployment="ns/keda-hpa-demo")
ON_CLUSTER = Autoscalers(on_cluster="ns/cpu")


def cluster(replicas: int = 3, enabled: bool = False) -> GpuProxyCluster:
    return parse_cluster({
        "apiVersion": "gpuproxy.aiserve.farm/v1alpha1", "kind": "GpuProxyCluster",
        "metadata": {"name": "demo", "namespace": "ns"},
        "spec": {"proxy": {"backends": [{"name": "a", "url": "http://a:8000"}],
                           "replicas": replicas},
                 "database": {"host": "pg", "credentialsSecret": "db"},
                 "autoscaling": {"enabled": enabled, "minReplicas": 2, "maxReplicas": 10}},
    })


def status(owner: str, handover: int | None = None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"replicasOwner": owner, **extra}
    if handover is not None:
        out["handoverSpecReplicas"] = handover
    return out


def test_autoscalers_are_found_by_their_target() -> None:
    def hpa(name: str, kind: str, target: str) -> dict[str, Any]:
        return {"metadata": {"name": name, "namespace": "ns"},
                "spec": {"scaleTargetRef": {"kind": kind, "name": target}}}

    found = find_autoscalers([hpa("other", "Deployment", "x"), hpa("cpu", "GpuProxyCluster",
                              "demo"), hpa("keda-hpa-demo", "Deployment", "demo-proxy")],
                             "demo-proxy", "demo")
    assert found == Autoscalers("ns/keda-hpa-demo", "ns/cpu")
    assert find_autoscalers([], "demo-proxy", "demo") == NONE


def test_spec_owns_when_nothing_else_does() -> None:
    owned = resolve(cluster(3), {}, NONE, observed=2)
    assert (owned.owner, owned.replicas, owned.handover, owned.event) == ("Spec", 3, None, None)
    assert "kubectl scale gpc demo" in owned.message
    assert owned.status_fields() == {"replicasOwner": "Spec", "replicasOwnerMessage":
                                     owned.message, "handoverSpecReplicas": None}
    # An HPA on the GpuProxyCluster's scale subresource writes spec.proxy.replicas: still Spec.
    owned = resolve(cluster(4), status("Spec"), ON_CLUSTER, observed=3)
    assert (owned.owner, owned.replicas) == ("Spec", 4)
    assert "HorizontalPodAutoscaler ns/cpu through the scale subresource" in owned.message


def test_an_external_autoscaler_on_the_deployment_is_left_alone() -> None:
    for enabled in (False, True):
        owned = resolve(cluster(3, enabled), status("Spec"), ON_DEPLOYMENT, observed=7)
        assert (owned.owner, owned.replicas, owned.handover) == ("External", 7, 3)
        assert "HorizontalPodAutoscaler ns/keda-hpa-demo" in owned.message
        assert owned.event is not None
        assert owned.event[:2] == ("Normal", "ReplicasOwnerChanged")
        assert ("spec.autoscaling.enabled is true too" in owned.message) is enabled
    # Two autoscalers on one thing: the operator's stands aside.
    owned = resolve(cluster(3, True), status("Autoscaler"), ON_CLUSTER, observed=7)
    assert (owned.owner, owned.replicas) == ("External", 7)
    # Deployment deleted meanwhile: re-created at spec.proxy.replicas, the HPA takes it on.
    assert resolve(cluster(3), status("External"), ON_DEPLOYMENT, observed=None).replicas == 3


def test_the_autoscaler_keeps_the_count_and_reconcile_never_writes_it() -> None:
    # Whatever status.desiredReplicas says (possibly stale): the Deployment's count is kept.
    owned = resolve(cluster(3, True), status("Autoscaler", 3, desiredReplicas=5), NONE,
                    observed=8)
    assert (owned.owner, owned.replicas, owned.handover, owned.event) == (
        "Autoscaler", 8, 3, None)
    # Even above maxReplicas: the autoscaler paces that clamp itself.
    assert resolve(cluster(3, True), status("Autoscaler", 3), NONE, observed=14).replicas == 14
    # Creating the Deployment: where the autoscaler last was, within its bounds.
    assert resolve(cluster(3, True), status("Autoscaler", 3, desiredReplicas=5), NONE,
                   observed=None).replicas == 5
    assert resolve(cluster(3, True), status("Autoscaler", 3, desiredReplicas=50), NONE,
                   observed=None).replicas == 10
    assert resolve(cluster(1, True), {}, NONE, observed=None).replicas == 2


def test_kubectl_scale_while_the_autoscaler_owns_is_reported_once() -> None:
    owned = resolve(cluster(5, True), status("Autoscaler", 3), NONE, observed=8)
    assert (owned.replicas, owned.handover) == (8, 5)
    assert owned.event is not None
    kind, reason, message = owned.event
    assert (kind, reason) == ("Warning", "ScaleIgnored")
    assert "from 3 to 5" in message
    assert "spec.proxy.replicas (5) is ignored" in owned.message
    # Reported: the next reconcile (status remembers 5) stays quiet.
    assert resolve(cluster(5, True), status("Autoscaler", 5), NONE, observed=8).event is None


def test_turning_autoscaling_off_keeps_the_count_until_the_spec_changes() -> None:
    # The autoscaler had 7; spec.proxy.replicas is a stale 3 from before.
    owned = resolve(cluster(3), status("Autoscaler", 3), NONE, observed=7)
    assert (owned.owner, owned.replicas, owned.handover) == ("Spec", 7, 3)
    assert owned.event is not None
    assert owned.event[1] == "ReplicasOwnerChanged"
    assert "keeps the 7 replicas" in owned.message
    # Later passes keep it, while spec.proxy.replicas stays what it was at the handover.
    again = resolve(cluster(3), status("Spec", 3), NONE, observed=7)
    assert (again.replicas, again.handover, again.event) == (7, 3, None)
    # Changed after the switch: it applies, upwards at once...
    up = resolve(cluster(9), status("Spec", 3), NONE, observed=7)
    assert (up.replicas, up.handover) == (9, None)
    # ...and downwards through the paced scale-down of the autoscaling loop.
    down = resolve(cluster(4), status("Spec", 3), NONE, observed=7)
    assert (down.replicas, down.handover) == (7, None)
    assert "scaling down from 7" in down.message
    assert resolve(cluster(4), status("Spec"), NONE, observed=7).replicas == 7
    # An explicit new value in the very edit that turns autoscaling off is not stale.
    assert resolve(cluster(5), status("Autoscaler", 3), NONE, observed=7).handover is None
    # Once the Deployment has the spec's count there is nothing to remember.
    assert resolve(cluster(7), status("Spec", 7), NONE, observed=7).handover is None


def test_an_external_autoscaler_leaving_hands_over_its_count() -> None:
    owned = resolve(cluster(3), status("External", 3), NONE, observed=11)
    assert (owned.owner, owned.replicas, owned.handover) == ("Spec", 11, 3)


def test_descent_pending_follows_the_status_reconcile_wrote() -> None:
    def body(spec_replicas: int | None, **st: Any) -> dict[str, Any]:
        proxy = {} if spec_replicas is None else {"replicas": spec_replicas}
        return {"spec": {"proxy": proxy}, "status": st}

    assert descent_pending(body(2, replicasOwner="Spec", replicas=5))
    assert not descent_pending(body(2, replicasOwner="Spec", replicas=2))
    assert not descent_pending(body(2, replicasOwner="Spec", handoverSpecReplicas=2, replicas=5))
    assert not descent_pending(body(2, replicasOwner="Autoscaler", replicas=5))
    assert not descent_pending(body(2, replicasOwner="External", replicas=5))
    assert not descent_pending(body(2))
    default = ProxySpec.model_fields["replicas"].default
    assert descent_pending(body(None, replicasOwner="Spec", replicas=default + 1))
    assert not descent_pending(body(None, replicasOwner="Spec", replicas=default))
