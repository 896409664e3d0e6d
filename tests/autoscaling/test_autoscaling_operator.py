"""End to end through the REAL operator (kopf, reconcile and the autoscaler) against kmock, with
a fake Deployment controller whose pods are REAL proxy processes on 127.0.0.2-5: clients connect,
the operator scales the proxy Deployment up, and after the scale-down window back down, with
status, the Scaling condition and Events. Real time: about 30 s (intervals are >= 5 s)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import kmock
import kopf
import pytest
from tests.autoscaling.conftest import POD_IPS
from tests.autoscaling.proxies import ProxyProcess
from tests.reconcile import conftest as harness
from tests.reconcile.apiserver_contract import log_problems
from tests.reconcile.conftest import (
    OPERATOR_AGENTS,
    Cluster,
    Operator,
    cluster_body,
    condition,
    eventually,
    secret_body,
)

from gpuproxy_operator import handlers, kube
from gpuproxy_operator.autoscaling.kube_adapter import KubeScaling
from gpuproxy_operator.autoscaling.loop import ClusterScaler
from gpuproxy_operator.kube import POD_DELETION_COST
from gpuproxy_operator.naming import selector_labels

# Reuse every fixture of the reconcile harness (cluster, operator and what they depend on),
# whatever their names: the harness evolves with the operator.
globals().update({name: obj for name, obj in vars(harness).items()
                  if type(obj).__name__ == "FixtureFunctionDefinition"})

pytestmark = pytest.mark.slow
NS = "scale"


def _cost(pod: dict[str, Any]) -> int:
    return int((pod["metadata"].get("annotations") or {}).get(POD_DELETION_COST, "0"))


async def _pods_controller(env: Cluster, name: str) -> None:
    """The proxy Deployment's ReplicaSet: pods on the free addresses, ready at once; on a
    scale-down the lowest pod-deletion-cost goes first, then the newest (as the real one)."""
    names = [f"{name}-proxy-{i}" for i in range(len(POD_IPS))]
    while True:
        dep = env.find("Deployment", NS, f"{name}-proxy")
        want = (dep or {}).get("spec", {}).get("replicas", 0) if dep else 0
        live = {n: pod for n in names if (pod := env.find("Pod", NS, n)) is not None}
        if len(live) < min(want, len(names)):
            i = next(i for i, n in enumerate(names) if n not in live)
            await env.create({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": names[i], "namespace": NS, "resourceVersion": "1",
                             "labels": selector_labels(name, "proxy")},
                "status": {"phase": "Running", "podIP": POD_IPS[i],
                           "conditions": [{"type": "Ready", "status": "True"}]},
            })
        elif len(live) > want:
            order = list(live)
            gone = min(order, key=lambda n: (_cost(live[n]), -order.index(n)))
            await env.delete("Pod", NS, gone)
        await asyncio.sleep(0.05)


@pytest.fixture
async def pods_controller(cluster: Cluster) -> AsyncIterator[None]:
    task = asyncio.create_task(_pods_controller(cluster, "demo"))
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _status(env: Cluster) -> dict[str, Any]:
    return env.get("GpuProxyCluster", NS, "demo").get("status") or {}


def autoscaler_steps(env: Cluster) -> int:
    """Each step of the scaling loop reads the proxy Deployment (reconcile lists it)."""
    path = env.path("Deployment", NS, "demo-proxy")
    return sum(1 for r in list(env.server) if r.url.path == path and r.method.value == "GET"
               and r.headers.get("User-Agent", "").startswith("gpuproxy-operator"))


def status_writes(env: Cluster, since: int) -> list[str]:
    return [w for w in env.operator_writes(since) if w.endswith("/status")]


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
    await eventually(lambda: _status(cluster).get("desiredReplicas") == 3, timeout=30)
    status = _status(cluster)
    assert status["currentConnections"] == 200
    assert "lastScaleTime" in status
    assert condition(cluster.get("GpuProxyCluster", NS, "demo"), "Scaling")["status"] == "True"
    await eventually(lambda: [e for e in cluster.events(NS) if e["reason"] == "ScaledUp"],
                     timeout=60)

    # Steady (the same 200 clients on 3 ready pods): once two steps pass without a status
    # write (the new pods reported), the next three write nothing either, neither the
    # autoscaler nor reconcile. (Before: one write per step.)
    async def writes_over(count: int) -> list[str]:
        mark, steps = cluster.mark(), autoscaler_steps(cluster)
        await eventually(lambda: autoscaler_steps(cluster) >= steps + count, timeout=90)
        return status_writes(cluster, mark)

    for _ in range(10):
        if not await writes_over(2):
            break
    else:
        raise AssertionError("every pair of steps wrote the status")
    assert await writes_over(3) == []

    # Clients leave: the window holds 3 replicas a while, then the operator scales down to 1.
    proxy_pods[0].close_clients()
    reasons: set[str] = set()

    def scaled_down() -> bool:
        cond = condition(cluster.find("GpuProxyCluster", NS, "demo"), "Scaling")
        reasons.add(cond.get("reason", ""))
        return bool(cluster.get("Deployment", NS, "demo-proxy")["spec"]["replicas"] == 1)

    await eventually(scaled_down, timeout=90)
    assert "ScaleDownStabilized" in reasons
    await eventually(lambda: _status(cluster)["desiredReplicas"] == 1, timeout=30)
    down = await eventually(lambda: [e for e in cluster.events(NS)
                                     if e["reason"] == "ScaledDown"], timeout=60)
    assert "from 3 to 1" in down[0]["message"]
    # Reconcile and the autoscaler agree: no one puts the replicas back.
    await asyncio.sleep(1)
    assert cluster.get("Deployment", NS, "demo-proxy")["spec"]["replicas"] == 1


async def test_pods_from_api_bodies_terminating_ones_not_counted_least_loaded_marked(
        cluster: Cluster, api_server: Any, proxy_pods: list[ProxyProcess]) -> None:
    """The real adapter over kmock (kube.list_component_pods on API bodies): a pod with a
    deletionTimestamp is not counted; before a scale-down each counted pod's deletion cost is
    set to its connections, then the replicas go down; requests a real API server takes."""
    body = cluster_body("demo", NS, proxy={
        "adminPort": proxy_pods[0].admin_port, "connectionsPerReplica": 100,
        "backends": [{"name": "vllm-0", "url": "http://vllm-0.gpu.svc:8000"}]})
    body["spec"]["autoscaling"] = {
        "enabled": True, "minReplicas": 1, "maxReplicas": 4, "targetConnections": 400,
        "behavior": {"scaleDown": {"stabilizationWindowSeconds": 0, "policies": [
            {"type": "Percent", "value": 100, "periodSeconds": 15}]}}}
    await cluster.create(body)
    await cluster.create({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {
        "name": "demo-proxy", "namespace": NS, "resourceVersion": "1"}, "spec": {"replicas": 3}})
    pods = []
    for i, ip in enumerate(POD_IPS):
        meta: dict[str, Any] = {"name": f"demo-proxy-{i}", "namespace": NS,
                                "resourceVersion": "1", "labels": selector_labels("demo", "proxy")}
        pods.append({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "status": {
            "phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}})
        if i < 3:
            await cluster.create(pods[-1])
    # The fourth is being deleted, still draining its clients: kmock would hide it, so the pod
    # list is served as a real API server would (patches still reach the stored three).
    pods[3]["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    api_server[kmock.action.LIST, kmock.resource("", "v1", "pods")] << {
        "apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "9"},
        "items": pods}
    counts = [5, 0, 2, 50]
    try:
        for pod, count in zip(proxy_pods, counts, strict=True):
            pod.close_clients()
            pod.open_clients(count)
        for pod, count in zip(proxy_pods, counts, strict=True):
            await asyncio.to_thread(pod.wait_for_connections, count)
        client = kube.KubeClient(kopf.ConnectionInfo(server=str(api_server.url).rstrip("/")))
        mark = cluster.mark()
        try:
            async with aiohttp.ClientSession() as session:
                scaler = ClusterScaler(KubeScaling(client), session, scrape_timeout=10)
                out = await scaler.step(cluster.get("GpuProxyCluster", NS, "demo"))
        finally:
            await client.close()
    finally:
        for pod in proxy_pods:
            pod.close_clients()
    assert out is not None
    # 7 connections on the 3 counted pods (not the terminating pod's 50): 1 replica.
    assert (out.current_connections, out.desired_replicas) == (7, 1)
    assert cluster.get("Deployment", NS, "demo-proxy")["spec"]["replicas"] == 1
    costs = {f"demo-proxy-{i}": (cluster.get("Pod", NS, f"demo-proxy-{i}")["metadata"].get(
        "annotations") or {}).get(POD_DELETION_COST) for i in range(3)}
    assert costs == {"demo-proxy-0": "5", "demo-proxy-1": "0", "demo-proxy-2": "2"}
    writes = cluster.operator_writes(mark)
    assert f"PATCH {cluster.path('Pod', NS, 'demo-proxy-3')}" not in writes
    deployment = f"PATCH {cluster.path('Deployment', NS, 'demo-proxy')}"
    assert all(writes.index(f"PATCH {cluster.path('Pod', NS, f'demo-proxy-{i}')}")
               < writes.index(deployment) for i in range(3))
    requests = [r for r in list(cluster.server)[mark:]
                if r.headers.get("User-Agent", "").startswith(OPERATOR_AGENTS)]
    problems = log_problems(requests, agents=OPERATOR_AGENTS)
    assert not problems, "\n".join(problems)


async def test_a_lower_spec_replicas_is_reached_gently_least_loaded_first(
    cluster: Cluster,
    operator: Operator,
    pods_controller: None,
    proxy_pods: list[ProxyProcess],
) -> None:
    """Autoscaling off: `kubectl scale gpc demo --replicas 1` from 4. Reconcile leaves the
    scale-down to the scaling loop, which removes one pod per period (1 per 5 s here), each
    time the least loaded (pod-deletion-cost), then stops; no one puts replicas back."""
    assert handlers.load_autoscaling()
    proxy = {"replicas": 4, "adminPort": proxy_pods[0].admin_port, "connectionsPerReplica": 100,
             "backends": [{"name": "vllm-0", "url": "http://vllm-0.gpu.svc:8000"}]}
    body = cluster_body("demo", NS, proxy=proxy)
    body["spec"]["autoscaling"] = {"enabled": False, "intervalSeconds": 5, "behavior": {
        "scaleDown": {"stabilizationWindowSeconds": 300, "policies": [
            {"type": "Pods", "value": 1, "periodSeconds": 5}]}}}
    counts = [30, 0, 20, 10]
    try:
        for pod, count in zip(proxy_pods, counts, strict=True):
            pod.close_clients()
            pod.open_clients(count)
        for pod, count in zip(proxy_pods, counts, strict=True):
            await asyncio.to_thread(pod.wait_for_connections, count)
        await cluster.create(secret_body(NS))
        await cluster.create(body)
        await operator.start()
        await eventually(lambda: _status(cluster).get("replicasOwner") == "Spec", timeout=60)
        await eventually(lambda: len([p for p in cluster.live() if p.get("kind") == "Pod"]) == 4,
                         timeout=60)
        mark = cluster.mark()
        await cluster.edit_spec(NS, "demo", {"proxy": {**proxy, "replicas": 1}})
        seen: list[tuple[float, int]] = []
        loop = asyncio.get_running_loop()

        def at_one() -> bool:
            have = cluster.get("Deployment", NS, "demo-proxy")["spec"]["replicas"]
            if not seen or seen[-1][1] != have:
                seen.append((loop.time(), have))
            return bool(have == 1)

        await eventually(at_one, timeout=120)
        await eventually(lambda: {p["metadata"]["name"] for p in cluster.live()
                                  if p.get("kind") == "Pod"} == {"demo-proxy-0"}, timeout=60)
    finally:
        for pod in proxy_pods:
            pod.close_clients()
    # One pod per step, at least a period apart (the poll may see a step a little late).
    assert [r for _, r in seen] == [4, 3, 2, 1]
    assert all(b - a >= 4.0 for (a, _), (b, _) in itertools.pairwise(seen[1:]))
    downs = [e["message"] for e in cluster.events(NS) if e["reason"] == "ScaledDown"]
    assert len(downs) == 3
    # Only the loop wrote the replicas (one PATCH per step); reconcile never did.
    dep = f"PATCH {cluster.path('Deployment', NS, 'demo-proxy')}"
    assert cluster.operator_writes(mark).count(dep) == 3
    # Done: the loop stops (kmock has no resourceVersion checks, so reconcile's status writes
    # may drop the Scaling condition here; the FakeKube tests check its final Disabled).
    steps = autoscaler_steps(cluster)
    await asyncio.sleep(7)  # more than one intervalSeconds
    assert autoscaler_steps(cluster) - steps <= 1  # at most a step that was under way
    assert cluster.get("Deployment", NS, "demo-proxy")["spec"]["replicas"] == 1
