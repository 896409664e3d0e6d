"""The autoscaling loop against REAL proxy processes on 127.0.0.2-5 with real client connections:
scale up on load, hold during the scale-down window and while a pod cannot be read, scale down
after, with status, the Scaling condition and Events. Kubernetes is the in-memory FakeKube (a
fake Deployment controller whose pods are those addresses); time is an injected clock, so the
windows pass without waiting."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from tests.autoscaling.conftest import POD_IPS
from tests.autoscaling.fakekube import FakeKube
from tests.autoscaling.proxies import ProxyProcess

from gpuproxy_operator.autoscaling.loop import ClusterScaler

pytestmark = pytest.mark.slow

T0 = 1_800_000_000.0
# Real proxies on a possibly loaded machine: a slow /stats must not count as "unreadable" (the
# pod that is meant to be unreadable is stopped, so it is refused at once).
SCRAPE_TIMEOUT = 10


def cluster_body(admin_port: int) -> dict[str, Any]:
    return {
        "apiVersion": "gpuproxy.aiserve.farm/v1alpha1",
        "kind": "GpuProxyCluster",
        "metadata": {"name": "demo", "namespace": "ns", "generation": 3, "uid": "u1"},
        "spec": {
            "proxy": {"backends": [{"name": "a", "url": "http://a:8000"}],
                      "adminPort": admin_port, "connectionsPerReplica": 100},
            "database": {"host": "pg", "credentialsSecret": "db"},
            # 100 per replica with 20% headroom: 80 per replica; 400 needs 5, max is 4.
            "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 4,
                            "targetConnections": 400,
                            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 60,
                                                       "policies": [{"type": "Percent",
                                                                     "value": 100,
                                                                     "periodSeconds": 15}]}}},
        },
    }


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def spread(pods: list[ProxyProcess], counts: list[int]) -> None:
    for pod, count in zip(pods, counts, strict=False):
        pod.close_clients()
        pod.open_clients(count)
    for pod, count in zip(pods, counts, strict=False):
        pod.wait_for_connections(count)


async def test_scales_up_on_real_connections_and_down_after_the_window(
    proxy_pods: list[ProxyProcess], session: aiohttp.ClientSession
) -> None:
    kube = FakeKube(cluster_body(proxy_pods[0].admin_port), POD_IPS, replicas=1)
    clock = Clock()
    scaler = ClusterScaler(kube, session, clock=clock, scrape_timeout=SCRAPE_TIMEOUT)

    # Idle: stays at minReplicas.
    spread(proxy_pods, [0, 0, 0, 0])
    out = await scaler.step(kube.body)
    assert out is not None
    assert out.desired_replicas == 1
    assert kube.replica_writes == []
    assert kube.events == []
    assert kube.status["currentConnections"] == 0

    # 200 clients on the one pod: 200 / 80 -> 3 replicas at once (+4 pods/15 s allowed).
    spread(proxy_pods, [200])
    clock.now += 15
    await scaler.step(kube.body)
    assert kube.replica_writes == [3]
    assert kube.status["desiredReplicas"] == 3
    assert kube.status["currentConnections"] == 200
    assert kube.status["lastScaleTime"] == "2027-01-15T08:00:15Z"
    cond = kube.condition()
    assert (cond["status"], cond["reason"], cond["observedGeneration"]) == (
        "True", "MetricsRecommendation", 3)
    assert "from 1 to 3" in cond["message"]
    assert [(t, r) for t, r, _ in kube.events] == [("Normal", "ScaledUp")]
    assert kube.cost_writes == []  # only a scale-down marks pods

    # Clients spread over the 3 pods: the same total, no change.
    spread(proxy_pods, [67, 67, 66])
    clock.now += 15
    out = await scaler.step(kube.body)
    assert out is not None
    assert out.current_connections == 200
    assert kube.replica_writes == [3]

    # Load gone: the 60 s scale-down window holds the replicas.
    spread(proxy_pods, [0, 0, 0])
    clock.now += 15
    await scaler.step(kube.body)
    assert kube.replicas == 3
    assert kube.condition()["reason"] == "ScaleDownStabilized"

    # An operator restart (a new scaler, state from status) keeps the window.
    restarted_body = copy.deepcopy(kube.body)
    scaler = ClusterScaler(kube, session, clock=clock, scrape_timeout=SCRAPE_TIMEOUT)
    clock.now += 15
    await scaler.step(restarted_body)
    assert kube.replicas == 3
    assert kube.condition()["reason"] == "ScaleDownStabilized"

    # After the window, but pod 3's proxy is down (its /stats unreadable): no scale-down.
    proxy_pods[2].stop()
    clock.now += 60
    await scaler.step(kube.body)
    assert kube.replicas == 3
    assert kube.condition()["reason"] == "MissingMetrics"
    assert "demo-proxy-2: /stats unreadable" in kube.condition()["message"]

    # The pod is back with a few clients, and the second pod has the most: once the window
    # has passed the hold, it scales down to one pod, and the two least loaded pods go (each
    # pod's pod-deletion-cost is its connection count, set right before the replicas).
    proxy_pods[2].start()
    spread(proxy_pods, [0, 30, 5])
    clock.now += 61
    calls = len(kube.calls)
    await scaler.step(kube.body)
    assert kube.replica_writes == [3, 1]
    assert kube.status["desiredReplicas"] == 1
    assert sorted(kube.cost_writes) == [("demo-proxy-0", 0), ("demo-proxy-1", 30),
                                        ("demo-proxy-2", 5)]
    # Pods marked, then the status with the scale event (a successor operator must know of
    # it, even if this one dies now), then the replicas.
    step_calls = kube.calls[calls:]
    assert step_calls.index("set_deletion_cost") < step_calls.index("patch_status") \
        < step_calls.index("set_replicas")
    assert '"e":[[' in kube.status_writes[-1]["autoscalerState"]
    assert kube.removed == [POD_IPS[0], POD_IPS[2]]
    assert [p.ip for p in await kube.list_proxy_pods("ns", "demo")] == [POD_IPS[1]]
    assert [(t, r) for t, r, _ in kube.events] == [("Normal", "ScaledUp"), ("Normal", "ScaledDown")]
    assert kube.status["lastScaleTime"] == "2027-01-15T08:03:01Z"
    spread(proxy_pods, [0, 0, 0])


async def test_an_hpa_on_the_deployment_is_reported_not_fought(
    proxy_pods: list[ProxyProcess], session: aiohttp.ClientSession
) -> None:
    kube = FakeKube(cluster_body(proxy_pods[0].admin_port), POD_IPS, replicas=2)
    kube.autoscalers = [{"metadata": {"name": "cpu", "namespace": "ns"},
                         "spec": {"scaleTargetRef": {"apiVersion": "apps/v1",
                                                     "kind": "Deployment",
                                                     "name": "demo-proxy"}}}]
    spread(proxy_pods, [300, 300])
    scaler = ClusterScaler(kube, session, clock=Clock(), scrape_timeout=SCRAPE_TIMEOUT)
    for _ in range(2):
        await scaler.step(kube.body)
    spread(proxy_pods, [0, 0])
    assert kube.replica_writes == []
    assert kube.cost_writes == []
    assert "list_proxy_pods" not in kube.calls  # it does not even scrape
    cond = kube.condition()
    assert (cond["status"], cond["reason"]) == ("False", "ReplicasOwnedElsewhere")
    assert "HorizontalPodAutoscaler ns/cpu" in cond["message"]
    assert [(t, r) for t, r, _ in kube.events] == [("Warning", "ReplicasOwnedElsewhere")]
