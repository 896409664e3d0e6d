"""ClusterScaler steps against tiny /stats servers on 127.0.0.11-14 (counts set by the test) and
the in-memory FakeKube, on an injected clock: status writes only on significant change (and
their rate when steady), checkpoints that survive a restart, unanswered pods counted at the
target, terminating pods not counted, and the paced spec.proxy.replicas descent."""

from __future__ import annotations

import asyncio
import copy
import random
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from tests.autoscaling.fakekube import FakeKube

from gpuproxy_operator.autoscaling.loop import REFRESH_SECONDS, ClusterScaler
from gpuproxy_operator.autoscaling.report import FIELDS

IPS = ["127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14"]
T0 = 1_800_000_000.0
HANG = -1  # a count that makes that /stats never answer


class Stats:
    """The /stats servers: `counts[ip]` connections, or no answer at all with HANG."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(IPS, 0)
        self.port = 0

    def set(self, *counts: int) -> None:
        for ip, count in zip(IPS, counts, strict=False):
            self.counts[ip] = count

    async def handle(self, request: web.Request) -> web.Response:
        count = self.counts[request.url.host or ""]
        if count == HANG:
            await asyncio.sleep(3600)  # only the scrape timeout ends this
        return web.json_response({"connections_active": count})


@pytest.fixture
async def stats() -> AsyncIterator[Stats]:
    server = Stats()
    with socket.socket() as s:
        s.bind((IPS[0], 0))
        server.port = s.getsockname()[1]
    runners = []
    for ip in IPS:
        app = web.Application()
        app.router.add_get("/stats", server.handle)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        await web.TCPSite(runner, ip, server.port).start()
        runners.append(runner)
    yield server
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def body(port: int, enabled: bool = True, **autoscaling: Any) -> dict[str, Any]:
    """100 connections per replica with 20% headroom: a target of 80 per replica."""
    return {
        "apiVersion": "gpuproxy.aiserve.farm/v1alpha1", "kind": "GpuProxyCluster",
        "metadata": {"name": "demo", "namespace": "ns", "generation": 1, "uid": "u1",
                     "resourceVersion": "1"},
        "spec": {"proxy": {"backends": [{"name": "a", "url": "http://a:8000"}],
                           "adminPort": port, "connectionsPerReplica": 100, "replicas": 2},
                 "database": {"host": "pg", "credentialsSecret": "db"},
                 "autoscaling": {"enabled": enabled, "minReplicas": 1, "maxReplicas": 4,
                                 "targetConnections": 400, **autoscaling}},
    }


def scaler(kube: FakeKube, session: aiohttp.ClientSession, clock: Clock) -> ClusterScaler:
    # Loopback servers answer in milliseconds; the hanging one is ended by this timeout.
    return ClusterScaler(kube, session, clock=clock, scrape_timeout=3)


async def steps(s: ClusterScaler, kube: FakeKube, clock: Clock, count: int,
                seconds: float = 15) -> None:
    for _ in range(count):
        clock.now += seconds
        await s.step(kube.body)


async def test_a_steady_cluster_writes_no_status(stats: Stats,
                                                 session: aiohttp.ClientSession) -> None:
    kube = FakeKube(body(stats.port), IPS, replicas=4)
    clock = Clock()
    s = scaler(kube, session, clock)
    stats.set(80, 80, 80, 80)  # exactly the target: within tolerance
    await s.step(kube.body)
    assert len(kube.status_writes) == 1
    first = kube.status_writes[0]
    # Only the autoscaler's fields (conditions carries its Scaling condition).
    assert set(first) <= {*FIELDS, "conditions"}
    assert "autoscalerState" in first  # the first checkpoint

    # A small move of the count (under 5%) waits for the refresh.
    stats.set(80, 80, 80, 84)
    await steps(s, kube, clock, 1)
    assert len(kube.status_writes) == 1

    # 20 steps (5 minutes) at the first load: not one write, not one event.
    stats.set(80, 80, 80, 80)
    await steps(s, kube, clock, 20)
    assert len(kube.status_writes) == 1
    assert kube.events == []
    assert kube.replica_writes == []

    # A clear move is written at once, alone (and the state that did not change is not).
    stats.set(80, 80, 80, 100)
    await steps(s, kube, clock, 1)
    assert len(kube.status_writes) == 2
    assert kube.status_writes[1]["currentConnections"] == 340
    assert "autoscalerState" not in kube.status_writes[1]
    # A small one later waits until REFRESH_SECONDS after that write.
    stats.set(80, 80, 80, 99)
    await steps(s, kube, clock, int(REFRESH_SECONDS // 15) - 1)
    assert len(kube.status_writes) == 2
    await steps(s, kube, clock, 1)
    assert len(kube.status_writes) == 3
    assert kube.status["currentConnections"] == 339


async def test_status_writes_per_minute_under_a_noisy_steady_load(
        stats: Stats, session: aiohttp.ClientSession) -> None:
    """The measured figure: one hour at a steady load with +-2% noise on every pod, every
    15 s. Before: 4 writes per minute per cluster (one per step)."""
    kube = FakeKube(body(stats.port), IPS, replicas=4)
    clock = Clock()
    s = scaler(kube, session, clock)
    rng = random.Random(3)
    stats.set(80, 80, 80, 80)
    await s.step(kube.body)
    writes = len(kube.status_writes)
    for _ in range(240):
        stats.set(*(round(80 * rng.uniform(0.98, 1.02)) for _ in IPS))
        await steps(s, kube, clock, 1)
    per_minute = (len(kube.status_writes) - writes) / 60
    # Only the refresh of the (slightly changed) count: at most one per REFRESH_SECONDS, i.e.
    # 1/3 per minute, 0.33 per second at 100 clusters (from 6.7).
    assert 0 < per_minute <= 60 / REFRESH_SECONDS
    assert kube.replica_writes == []


async def test_checkpoints_keep_the_window_across_a_restart(
        stats: Stats, session: aiohttp.ClientSession) -> None:
    kube = FakeKube(body(stats.port, behavior={"scaleDown": {
        "stabilizationWindowSeconds": 120,
        "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}]}}), IPS, replicas=1)
    clock = Clock()
    s = scaler(kube, session, clock)
    stats.set(200)  # 200 / 80 -> 3 replicas
    await s.step(kube.body)
    assert kube.replica_writes == [3]
    assert "autoscalerState" in kube.status_writes[-1]  # a scale is always checkpointed
    stats.set(0, 0, 0)
    await steps(s, kube, clock, 2)
    assert kube.condition()["reason"] == "ScaleDownStabilized"

    # A restart 15 s later: the new scaler resumes from status and the window still holds 3.
    # Whatever the checkpoint missed, the window is never shorter than without the restart:
    # it starts again at the current count (here 120 s from T0 + 45 instead of T0 + 30).
    s = scaler(kube, session, clock)
    await steps(s, kube, clock, 1)
    assert kube.replicas == 3
    await steps(s, kube, clock, 7)  # T0 + 150
    assert kube.replicas == 3
    await steps(s, kube, clock, 1)  # T0 + 165
    assert kube.replica_writes == [3, 1]


async def test_an_unanswered_pod_counts_at_the_target_for_scale_up(
        stats: Stats, session: aiohttp.ClientSession) -> None:
    kube = FakeKube(body(stats.port), IPS, replicas=3)
    clock = Clock()
    s = scaler(kube, session, clock)
    # Two pods at 100 and the busiest one too slow to answer /stats: counted at 80, the
    # estimate is 280 over 3 pods (1.17 x the target) -> ceil(280 / 80) = 4 replicas.
    # (Counted as idle it was 200 over 3: within tolerance, no scale-up.)
    stats.set(100, 100, HANG)
    out = await s.step(kube.body)
    assert out is not None
    assert kube.replica_writes == [4]
    assert "demo-proxy-2: /stats timed out" in out.message
    # And never a scale-down while it does not answer, however idle the others are (each step
    # waits for the scrape timeout: few steps, far apart).
    stats.set(0, 0, HANG, 0)
    await steps(s, kube, clock, 2, seconds=600)
    assert kube.replica_writes == [4]
    assert kube.condition()["reason"] == "MissingMetrics"


async def test_terminating_pods_are_not_counted(stats: Stats,
                                                session: aiohttp.ClientSession) -> None:
    kube = FakeKube(body(stats.port), IPS, replicas=2)
    kube.terminating = {IPS[3]}  # a pod of an earlier scale-down, still draining
    stats.set(80, 80, 0, 500)
    out = await scaler(kube, session, Clock()).step(kube.body)
    assert out is not None
    assert (out.current_connections, out.reason) == (160, "WithinTolerance")
    assert "pods not reporting" not in out.message


async def test_a_lower_spec_replicas_is_reached_at_the_scale_down_pace(
        stats: Stats, session: aiohttp.ClientSession) -> None:
    """Autoscaling off, reconcile left the scale-down to the loop (status: owner Spec, no
    handover): one pod per 60 s (the default), the least loaded first."""
    kube = FakeKube(body(stats.port, enabled=False), IPS, replicas=4)
    kube.body["spec"]["proxy"]["replicas"] = 1
    kube.body["status"] = {"replicasOwner": "Spec", "replicas": 4}
    clock = Clock()
    s = scaler(kube, session, clock)
    stats.set(40, 3, 20, 10)
    await s.step(kube.body)
    assert kube.replica_writes == [3]
    assert kube.removed == [IPS[1]]  # 3 connections: the least loaded
    assert [r for _, r, _ in kube.events] == ["ScaledDown"]
    assert kube.condition()["reason"] == "SpecScaleDown"
    # The scale event is checkpointed: a restarted operator keeps the pace.
    assert '"e":[[' in kube.status["autoscalerState"]
    s = scaler(kube, session, clock)
    await steps(s, kube, clock, 3)  # 45 s: not yet
    assert kube.replica_writes == [3]
    assert kube.condition()["reason"] == "ScaleDownLimit"
    await steps(s, kube, clock, 9)
    assert kube.replica_writes == [3, 2, 1]
    assert kube.removed == [IPS[1], IPS[3], IPS[2]]  # 3, then 10, then 20 connections
    # Done: the condition says autoscaling is off, and the steps stop writing.
    await steps(s, kube, clock, 1)
    assert kube.condition()["reason"] == "Disabled"
    writes = len(kube.status_writes)
    await steps(s, kube, clock, 4)
    assert len(kube.status_writes) == writes


async def test_no_descent_while_the_handover_keeps_the_count(
        stats: Stats, session: aiohttp.ClientSession) -> None:
    kube = FakeKube(body(stats.port, enabled=False), IPS, replicas=4)
    kube.body["spec"]["proxy"]["replicas"] = 1
    kube.body["status"] = {"replicasOwner": "Spec", "handoverSpecReplicas": 1, "replicas": 4}
    before = copy.deepcopy(kube.body["status"])
    await scaler(kube, session, Clock()).step(kube.body)
    assert kube.replica_writes == []
    assert kube.status == before  # never autoscaled, nothing to do: no write at all
