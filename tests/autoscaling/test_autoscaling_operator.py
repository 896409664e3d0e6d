"""End to end through the REAL operator (kopf, reconcile and the autoscaler) against kmock, with
a fake Deployment controller whose pods are REAL proxy processes on 127.0.0.2-5: clients connect,
the operator scales the proxy Deployment up, and after the scale-down window back down, with
status, the Scaling condition and Events. Real time: about 30 s (intervals are >= 5 s)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from tests.autoscaling.conftest import POD_IPS
from tests.autoscaling.proxies import ProxyProcess
from tests.reconcile import conftest as harness
from tests.reconcile.conftest import (
    Cluster,
    Operator,
    cluster_body,
    condition,
    eventually,
    secret_body,
)

from gpuproxy_operator import handlers
from gpuproxy_operator.naming import selector_labels

# Reuse every fixture of the reconcile harness (cluster, operator and what they depend on),
# whatever their names: the harness evolves with the operator.
globals().update({name: obj for name, obj in vars(harness).items()
                  if type(obj).__name__ == "FixtureFunctionDefinition"})

pytestmark = pytest.mark.slow
NS = "scale"


async def _pods_controller(env: Cluster, name: str) -> None:
    """The proxy Deployment's pods: the first `replicas` addresses, ready at once."""
    while True:
        dep = env.find("Deployment", NS, f"{name}-proxy")
        want = (dep or {}).get("spec", {}).get("replicas", 0) if dep else 0
        for i, ip in enumerate(POD_IPS):
            pod_name = f"{name}-proxy-{i}"
            exists = env.find("Pod", NS, pod_name) is not None
            if i < want and not exists:
                await env.create({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": pod_name, "namespace": NS, "resourceVersion": "1",
                                 "labels": selector_labels(name, "proxy")},
                    "status": {"phase": "Running", "podIP": ip,
                               "conditions": [{"type": "Ready", "status": "True"}]},
                })
            elif i >= want and exists:
                await env.delete("Pod", NS, pod_name)
        await asyncio.sleep(0.05)


@pytest.fixture
async def pods_controller(cluster: Cluster) -> AsyncIterator[None]:
    task = asyncio.create_task(_pods_controller(cluster, "demo"))
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _status(env: Cluster) -> dict[str, Any]:
    return env.get("GpuProxyCluster", NS, "demo").get("status") or {}


async def test_operator_scales_the_deployment_on_real_connections(
    cluster: Cluster,
    operator: Operator,
    pods_controller: None,
    proxy_pods: list[ProxyProcess],
) -> None:
    assert handlers.load_autoscaling()
    body = cluster_body("demo", NS, proxy={
        "replicas": 1, "adminPort": proxy_pods[0].admin_port, "connectionsPerReplica": 100,
        "backends": [{"name": "vllm-0", "url": "http://vllm-0.gpu.svc:8000"}]})
    body["spec"]["autoscaling"] = {
        "enabled": True, "minReplicas": 1, "maxReplicas": 4, "targetConnections": 400,
        "intervalSeconds": 5,
        "behavior": {"scaleDown": {"stabilizationWindowSeconds": 12, "policies": [
            {"type": "Percent", "value": 100, "periodSeconds": 15}]}}}
    for pod in proxy_pods:
        pod.close_clients()
    await cluster.create(secret_body(NS))
    await cluster.create(body)
    await operator.start()

    # The first step sees the one idle pod.
    # Deadlines are generous (a loaded machine); a healthy run takes one or two intervals each.
    await eventually(lambda: _status(cluster).get("currentConnections") == 0, timeout=60)
    assert cluster.get("Deployment", NS, "demo-proxy")["spec"]["replicas"] == 1

    # 200 clients on it: 200 / 80 per replica -> 3.
    proxy_pods[0].open_clients(200)
    proxy_pods[0].wait_for_connections(200)
    await eventually(lambda: cluster.get("Deployment", NS, "demo-proxy")["spec"]["replicas"]
                     == 3, timeout=60)
    status = _status(cluster)
    assert status["desiredReplicas"] == 3
    assert status["currentConnections"] == 200
    assert "lastScaleTime" in status
    assert condition(cluster.get("GpuProxyCluster", NS, "demo"), "Scaling")["status"] == "True"
    await eventually(lambda: [e for e in cluster.events(NS) if e["reason"] == "ScaledUp"],
                     timeout=60)

    # Clients leave: the window holds 3 replicas a while, then the operator scales down to 1.
    proxy_pods[0].close_clients()
    reasons: set[str] = set()

    def scaled_down() -> bool:
        cond = condition(cluster.find("GpuProxyCluster", NS, "demo"), "Scaling")
        reasons.add(cond.get("reason", ""))
        return bool(cluster.get("Deployment", NS, "demo-proxy")["spec"]["replicas"] == 1)

    await eventually(scaled_down, timeout=90)
    assert "ScaleDownStabilized" in reasons
    assert _status(cluster)["desiredReplicas"] == 1
    down = await eventually(lambda: [e for e in cluster.events(NS)
                                     if e["reason"] == "ScaledDown"], timeout=60)
    assert "from 3 to 1" in down[0]["message"]
    # Reconcile and the autoscaler agree: no one puts the replicas back.
    await asyncio.sleep(1)
    assert cluster.get("Deployment", NS, "demo-proxy")["spec"]["replicas"] == 1
