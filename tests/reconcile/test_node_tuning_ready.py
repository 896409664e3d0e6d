"""The real operator against kmock with the chart's node tuning installed: NodeTuningReady
follows the DaemonSet's rollout, read by one GET per TTL (never a list or watch of DaemonSets)."""

from __future__ import annotations

from gpuproxy_operator.api.base import KIND
from gpuproxy_operator.platform import Platform
from tests.reconcile.conftest import (
    OPERATOR_AGENTS,
    Cluster,
    Operator,
    cluster_body,
    condition,
    eventually,
    secret_body,
)

DS_PATH = "/apis/apps/v1/namespaces/ops/daemonsets/gp-node-tuning"


def node_tuning(cluster: Cluster) -> dict[str, str]:
    return condition(cluster.find(KIND, "ns1", "demo"), "NodeTuningReady")


async def test_node_tuning_ready_follows_the_platform_daemonset(
        cluster: Cluster, operator: Operator) -> None:
    operator.platform = Platform(node_tuning="ops/gp-node-tuning")
    cluster.ready = False
    await cluster.create(secret_body("ns1"))
    await cluster.create(cluster_body())
    await operator.start()
    await eventually(lambda: node_tuning(cluster).get("reason") == "DaemonSetMissing")
    assert node_tuning(cluster)["status"] == "False"

    await cluster.create({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {
        "name": "gp-node-tuning", "namespace": "ops"}, "spec": {}})
    # The fake controller reports 0/2 nodes ready while cluster.ready is False.
    await eventually(lambda: "0/2 nodes ready" in node_tuning(cluster).get("message", ""))
    assert node_tuning(cluster)["reason"] == "TuningInProgress"
    cluster.ready = True
    await eventually(lambda: node_tuning(cluster).get("reason") == "NodesTuned")
    assert node_tuning(cluster)["status"] == "True"
    # Node tuning never gates Ready.
    await eventually(lambda: condition(cluster.find(KIND, "ns1", "demo"), "Ready").get(
        "status") == "True")

    reads = [r for r in list(cluster.server) if r.url.path.startswith(
        "/apis/apps/v1/namespaces/ops/daemonsets")
        and r.headers.get("User-Agent", "").startswith(OPERATOR_AGENTS)]
    assert reads
    assert {(r.method.value, r.url.path) for r in reads} == {("GET", DS_PATH)}
