"""Pure status computation: conditions, transition times, phase, scale fields, quiet patches."""

from __future__ import annotations

from typing import Any

from gpuproxy_operator.api.cluster import parse_cluster
from gpuproxy_operator.builders import BuildInputs, DatabaseCredentials, build_all
from gpuproxy_operator.reconcile import key_of
from gpuproxy_operator.status import Observation, compute_status, condition, status_patch
from tests.reconcile.conftest import cluster_body

T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"


def observation(ready: bool = True, **kw: Any) -> Observation:
    cluster = parse_cluster(cluster_body(**kw.pop("spec", {})))
    desired = build_all(cluster, BuildInputs(DatabaseCredentials("u", "p")))
    children = {}
    for m in desired:
        obj = dict(m)
        if m["kind"] in ("Deployment", "StatefulSet"):
            n = m["spec"].get("replicas", 1)
            obj["status"] = {"replicas": n, "readyReplicas": n if ready else 0,
                             "updatedReplicas": n}
        children[key_of(m)] = obj
    return Observation(generation=4, cluster=cluster, children=children, desired=desired, **kw)


def test_ready_cluster() -> None:
    status = compute_status({}, observation(), T0)
    assert status["phase"] == "Ready"
    assert condition(status, "Ready")["status"] == "True"
    assert condition(status, "Degraded")["status"] == "False"
    assert condition(status, "Progressing")["reason"] == "Converged"
    assert all(c["observedGeneration"] == 4 for c in status["conditions"])
    assert (status["replicas"], status["readyReplicas"]) == (2, 2)
    assert status["selector"] == ("app.kubernetes.io/name=gpuproxy,"
                                  "app.kubernetes.io/instance=demo,app.kubernetes.io/component=proxy")
    assert status["endpoints"]["pgbouncer"] == "demo-pgbouncer.ns1.svc:6432"


def test_not_ready_names_what_is_waited_for_with_a_command() -> None:
    status = compute_status({}, observation(ready=False), T0)
    assert status["phase"] == "Progressing"
    ready = condition(status, "Ready")
    assert ready["status"] == "False"
    assert "ProxyReady: proxy Deployment: 0/2 pods ready" in ready["message"]
    # Node tuning is the platform's: reported, never waited for.
    assert "NodeTuningReady" not in ready["message"]
    assert condition(status, "NodeTuningReady")["reason"] == "NotInstalled"
    assert "kubectl -n ns1 get pods -l" in condition(status, "RedisReady")["message"]


def test_transition_time_is_kept_while_status_holds_and_no_patch_when_unchanged() -> None:
    first = compute_status({}, observation(), T0)
    again = compute_status(first, observation(), T1)
    assert again == first
    assert status_patch(first, again) is None
    worse = compute_status(first, observation(ready=False), T1)
    assert condition(worse, "Ready")["lastTransitionTime"] == T1
    assert condition(worse, "Degraded")["lastTransitionTime"] == T0
    patch = status_patch(first, worse)
    assert patch is not None
    assert set(patch) == {"phase", "conditions", "readyReplicas"}


def test_conditions_of_other_writers_are_kept() -> None:
    previous = {"conditions": [{"type": "Scaling", "status": "True", "reason": "ScaledUp"}],
                "desiredReplicas": 5}
    status = compute_status(previous, observation(), T0)
    assert condition(status, "Scaling")["reason"] == "ScaledUp"
    assert "desiredReplicas" not in status  # not ours: never rewritten


def test_invalid_spec() -> None:
    obs = Observation(generation=2, invalid=[("spec.autoscaling", "minReplicas must be <= max")])
    status = compute_status({}, obs, T0)
    assert status["phase"] == "Degraded"
    degraded = condition(status, "Degraded")
    assert degraded["reason"] == "InvalidSpec"
    assert "spec.autoscaling: minReplicas must be <= max" in degraded["message"]
    assert condition(status, "ProxyReady")["status"] == "Unknown"


def test_paused_and_missing_credentials_and_missing_monitoring_api() -> None:
    obs = observation(paused=True, withheld=3, credentials_problem="Secret ns1/db-creds not found",
                      missing_apis={"PrometheusRule": "not served"},
                      spec={"monitoring": {"prometheusRule": {"enabled": True}}})
    status = compute_status({}, obs, T0)
    assert status["phase"] == "Paused"
    assert "3 change(s)" in condition(status, "Paused")["message"]
    assert condition(status, "PgBouncerReady")["reason"] == "CredentialsUnavailable"
    assert condition(status, "Degraded")["status"] == "True"
    alerts = condition(status, "AlertsReady")
    assert alerts["reason"] == "PrometheusOperatorMissing"
    assert "skipped PrometheusRule" in alerts["message"]
