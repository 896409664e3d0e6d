"""The kopf-facing part: a loop per cluster started and stopped from watch events, stepping
every intervalSeconds (fake loop time), and quiet for clusters that never autoscaled."""

from __future__ import annotations

import asyncio
import copy
import logging
import socket
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from tests.autoscaling.fakekube import FakeKube

from gpuproxy_operator.autoscaling.handlers import TASK_PREFIX, Tracker, inactive_reason, track
from gpuproxy_operator.autoscaling.loop import ClusterScaler

log = logging.getLogger("test")


def body(enabled: bool = True, paused: bool = False) -> dict[str, Any]:
    return {
        "apiVersion": "gpuproxy.aiserve.farm/v1alpha1", "kind": "GpuProxyCluster",
        "metadata": {"name": "demo", "namespace": "ns", "generation": 1},
        "spec": {"proxy": {"backends": [{"name": "a", "url": "http://a:8000"}]},
                 "database": {"host": "pg", "credentialsSecret": "db"},
                 "autoscaling": {"enabled": enabled, "minReplicas": 1, "intervalSeconds": 15},
                 "paused": paused},
    }


def test_inactive_reason() -> None:
    assert inactive_reason(body()) is None
    assert inactive_reason(body(enabled=False)) == "Disabled"
    assert inactive_reason(body(paused=True)) == "Paused"
    descending = body(enabled=False)
    descending["status"] = {"replicasOwner": "Spec", "replicas": 5}  # spec.proxy.replicas 3
    assert inactive_reason(descending) is None
    descending["spec"]["paused"] = True
    assert inactive_reason(descending) == "Paused"
    deleting = body()
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert inactive_reason(deleting) == "Deleting"


@pytest.mark.looptime
async def test_loop_steps_every_interval_and_stops_when_disabled() -> None:
    kube = FakeKube(body(), pod_ips=[], replicas=1)  # no pod ever answers
    memo = SimpleNamespace()
    await track({"type": "ADDED"}, kube.body, memo, kube, log)
    tracker: Tracker = memo.autoscaler
    assert tracker.task is not None
    assert tracker.task.get_name() == f"{TASK_PREFIX}ns/demo"

    await asyncio.sleep(31)  # steps at 0, 15 and 30 s of loop time
    assert kube.calls.count("get_deployment") == 3
    cond = kube.condition()
    assert (cond["status"], cond["reason"]) == ("False", "NoReadyPods")
    assert kube.events == []  # normal while a new cluster starts: no Warning

    # A status-only event (our own patch) neither restarts nor duplicates the loop.
    task = tracker.task
    await track({"type": "MODIFIED"}, copy.deepcopy(kube.body), memo, kube, log)
    assert tracker.task is task

    # Disabled: the loop ends and the condition says why, once.
    disabled = copy.deepcopy(kube.body)
    disabled["spec"]["autoscaling"]["enabled"] = False
    await track({"type": "MODIFIED"}, disabled, memo, kube, log)
    assert task.done()
    assert tracker.task is None
    cond = kube.condition()
    assert (cond["status"], cond["reason"]) == ("False", "Disabled")
    writes = len(kube.status_writes)
    await track({"type": "MODIFIED"}, copy.deepcopy(kube.body) | {"spec": disabled["spec"]},
                memo, kube, log)
    await asyncio.sleep(60)
    assert len(kube.status_writes) == writes
    assert kube.calls.count("get_deployment") == 3


@pytest.mark.looptime
async def test_a_cluster_that_never_autoscaled_gets_no_writes() -> None:
    kube = FakeKube(body(enabled=False), pod_ips=[], replicas=1)
    memo = SimpleNamespace()
    for event in ("ADDED", "MODIFIED", "DELETED"):
        await track({"type": event}, kube.body, memo, kube, log)
    await asyncio.sleep(60)
    assert kube.calls == []


@pytest.mark.looptime
async def test_deletion_stops_the_loop() -> None:
    kube = FakeKube(body(), pod_ips=[], replicas=1)
    memo = SimpleNamespace()
    await track({"type": "ADDED"}, kube.body, memo, kube, log)
    task = memo.autoscaler.task
    await asyncio.sleep(1)
    await track({"type": "DELETED"}, kube.body, memo, kube, log)
    assert task.done()
    calls = len(kube.calls)
    await asyncio.sleep(60)
    assert len(kube.calls) == calls


async def test_ready_pods_that_cannot_be_read_are_a_warning_once() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.9", 0))
        port = s.getsockname()[1]
    cluster = body()
    cluster["spec"]["proxy"]["adminPort"] = port
    kube = FakeKube(cluster, pod_ips=["127.0.0.9"], replicas=1)
    async with aiohttp.ClientSession() as session:
        scaler = ClusterScaler(kube, session, scrape_timeout=1)
        for _ in range(3):
            await scaler.step(kube.body)
    cond = kube.condition()
    assert (cond["status"], cond["reason"]) == ("False", "MetricsUnavailable")
    assert "demo-proxy-0: /stats unreadable" in cond["message"]
    assert [(t, r) for t, r, _ in kube.events] == [("Warning", "MetricsUnavailable")]
    assert kube.replica_writes == []


async def test_a_stale_body_never_overwrites_newer_conditions() -> None:
    """The step's status patch replaces `conditions`: it is sent with the body's
    resourceVersion, and on a 409 rebuilt from a fresh read, so reconcile's newer Degraded
    (written after the watch event the loop holds) survives."""
    stale = body()
    stale["metadata"]["resourceVersion"] = "5"
    stale["status"] = {"conditions": [{"type": "Ready", "status": "True", "reason": "Ready"}]}
    newer = copy.deepcopy(stale)
    newer["metadata"]["resourceVersion"] = "6"
    newer["status"]["conditions"] = [
        {"type": "Degraded", "status": "True", "reason": "ChildRejected", "message": "x"}]
    kube = FakeKube(newer, pod_ips=[], deployment_exists=False)
    async with aiohttp.ClientSession() as session:
        await ClusterScaler(kube, session).step(stale)
    assert kube.calls.count("patch_status") == 2  # the first was refused (409)
    assert "get_cluster" in kube.calls
    kinds = {c["type"]: c["reason"] for c in kube.status["conditions"]}
    assert kinds == {"Degraded": "ChildRejected", "Scaling": "DeploymentMissing"}


@pytest.mark.looptime
async def test_a_spec_scale_down_runs_the_loop_until_reached() -> None:
    """Autoscaling off: the loop runs while reconcile says a spec.proxy.replicas scale-down is
    left to it (owner Spec, no handover, more pods than the spec), and stops after."""
    cluster = body(enabled=False)
    cluster["spec"]["proxy"]["replicas"] = 1
    cluster["status"] = {"replicasOwner": "Spec", "handoverSpecReplicas": 1, "replicas": 3}
    kube = FakeKube(cluster, pod_ips=[], replicas=3)
    memo = SimpleNamespace()
    await track({"type": "MODIFIED"}, kube.body, memo, kube, log)
    assert memo.autoscaler.task is None  # the handover keeps the count: nothing to do
    kube.body["status"].pop("handoverSpecReplicas")
    await track({"type": "MODIFIED"}, copy.deepcopy(kube.body), memo, kube, log)
    assert memo.autoscaler.task is not None
    # The default pace: one pod, then a minute (of wall-clock time, which looptime does not
    # move: the steps that follow wait for it).
    await asyncio.sleep(31)
    assert kube.replica_writes == [2]
    assert kube.calls.count("get_deployment") == 3
    assert kube.condition()["reason"] == "ScaleDownLimit"
    done = copy.deepcopy(kube.body)
    kube.replicas = 1
    done["status"]["replicas"] = 1  # reconcile reports the Deployment's pods
    await track({"type": "MODIFIED"}, done, memo, kube, log)
    assert memo.autoscaler.task is None
    assert kube.condition()["reason"] == "Disabled"
    calls = len(kube.calls)
    await asyncio.sleep(60)
    assert len(kube.calls) == calls


class SlowScale(FakeKube):
    async def set_replicas(self, namespace: str, deployment: str, replicas: int) -> None:
        await asyncio.sleep(5)
        await super().set_replicas(namespace, deployment, replicas)


@pytest.mark.looptime
async def test_stopping_never_cuts_a_step_between_the_scale_and_its_report() -> None:
    cluster = body(enabled=False)
    cluster["spec"]["proxy"]["replicas"] = 1
    cluster["status"] = {"replicasOwner": "Spec", "replicas": 3}
    kube = SlowScale(cluster, pod_ips=[], replicas=3)
    memo = SimpleNamespace()
    await track({"type": "MODIFIED"}, kube.body, memo, kube, log)
    await asyncio.sleep(1)  # the first step is inside set_replicas
    paused = copy.deepcopy(kube.body)
    paused["spec"]["paused"] = True
    await track({"type": "MODIFIED"}, paused, memo, kube, log)
    assert memo.autoscaler.task is None
    assert kube.replica_writes == [2]
    assert [r for _, r, _ in kube.events] == ["ScaledDown"]
    assert kube.status["lastScaleTime"]  # its report was written too
    assert kube.condition()["reason"] == "Paused"


async def test_steps_feed_the_operators_autoscaler_metrics() -> None:
    """GpuProxyAutoscalerCannotScale reads gpuproxy_operator_autoscaler_able: each step sets
    it, and a cluster that stops autoscaling drops it (no alert for nobody's autoscaler)."""
    from gpuproxy_operator.operator_metrics import OperatorMetrics

    metrics = OperatorMetrics()
    kube = FakeKube(body(), pod_ips=[], deployment_exists=False)
    async with aiohttp.ClientSession() as session:
        await ClusterScaler(kube, session, metrics=metrics).step(kube.body)

    def able() -> float | None:
        return metrics.registry.get_sample_value(
            "gpuproxy_operator_autoscaler_able", {"cluster_namespace": "ns", "cluster": "demo"})

    assert able() == 0.0  # DeploymentMissing: not able to scale (yet)
    steps = metrics.registry.get_sample_value(
        "gpuproxy_operator_autoscaler_steps_total",
        {"cluster_namespace": "ns", "cluster": "demo", "reason": "DeploymentMissing"})
    assert steps == 1.0
    disabled = FakeKube(body(enabled=False), pod_ips=[], deployment_exists=False)
    async with aiohttp.ClientSession() as session:
        await ClusterScaler(disabled, session, metrics=metrics).step(disabled.body)
    assert able() is None
