"""NodeTuningReady follows the platform DaemonSet's rollout (tuned nodes), not only its
existence; the DaemonSet is read at most once per TTL for every cluster together."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from tests.operator.clusters import cluster, minimal_body

from gpuproxy_operator import kube, status
from gpuproxy_operator.node_tuning import NodeTuningProbe, TuningSeen

REF = "ops/gp-node-tuning"


def daemonset(desired: int, ready: int, updated: int | None = None,
              generation: int = 2, observed: int = 2) -> dict[str, Any]:
    return {"metadata": {"name": "gp-node-tuning", "namespace": "ops",
                         "generation": generation},
            "status": {"desiredNumberScheduled": desired, "numberReady": ready,
                       "updatedNumberScheduled": desired if updated is None else updated,
                       "observedGeneration": observed}}


def condition(seen: TuningSeen | None) -> dict[str, Any]:
    obs = status.Observation(1, cluster=cluster(minimal_body()), node_tuning=REF,
                             node_tuning_seen=seen)
    new = status.compute_status({}, obs, "2026-01-01T00:00:00Z")
    return {c["type"]: c for c in new["conditions"]}["NodeTuningReady"]


def test_every_selected_node_tuned_is_true() -> None:
    cond = condition(TuningSeen(daemonset=daemonset(3, 3)))
    assert (cond["status"], cond["reason"]) == ("True", "NodesTuned")
    assert "3/3 nodes ready" in cond["message"]


@pytest.mark.parametrize("ds", [daemonset(3, 1), daemonset(3, 3, updated=1),
                                daemonset(3, 3, generation=3, observed=2)])
def test_a_rollout_in_progress_is_false_and_names_the_command(ds: dict[str, Any]) -> None:
    cond = condition(TuningSeen(daemonset=ds))
    assert (cond["status"], cond["reason"]) == ("False", "TuningInProgress")
    assert f"node-tuning DaemonSet {REF}" in cond["message"]


def test_a_daemonset_on_no_node_names_the_chart_values() -> None:
    cond = condition(TuningSeen(daemonset=daemonset(0, 0)))
    assert (cond["status"], cond["reason"]) == ("False", "NoNodesSelected")
    assert "nodeTuning.nodeSelector" in cond["message"]


def test_a_missing_daemonset_is_false_and_an_unreadable_one_unknown() -> None:
    missing = condition(TuningSeen(missing=True))
    assert (missing["status"], missing["reason"]) == ("False", "DaemonSetMissing")
    assert "nodeTuning.enabled=true" in missing["message"]
    unknown = condition(TuningSeen(error="403 forbidden"))
    assert (unknown["status"], unknown["reason"]) == ("Unknown", "StatusUnknown")
    assert "403 forbidden" in unknown["message"]
    assert "RBAC" in unknown["message"]


class _Api:
    """Answers GET DaemonSet from `answer` (a body or an exception), counting the reads."""

    def __init__(self, answer: dict[str, Any] | Exception) -> None:
        self.answer, self.reads = answer, 0

    async def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any]:
        assert (kind, namespace, name) == ("DaemonSet", "ops", "gp-node-tuning")
        self.reads += 1
        await asyncio.sleep(0)  # let concurrent observers pile up on the lock
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


async def test_the_probe_reads_once_per_ttl_for_all_clusters() -> None:
    now = [0.0]
    api = _Api(daemonset(2, 1))
    probe = NodeTuningProbe(REF, ttl=30.0, clock=lambda: now[0])
    seen = await asyncio.gather(*(probe.observe(api) for _ in range(5)))  # type: ignore[arg-type]
    assert api.reads == 1
    assert all(s.daemonset == daemonset(2, 1) for s in seen)
    api.answer = daemonset(2, 2)
    now[0] = 29.0
    assert (await probe.observe(api)).daemonset == daemonset(2, 1)  # type: ignore[arg-type]
    now[0] = 31.0
    assert (await probe.observe(api)).daemonset == daemonset(2, 2)  # type: ignore[arg-type]
    assert api.reads == 2


async def test_the_probe_turns_api_errors_into_observations() -> None:
    missing = await NodeTuningProbe(REF).observe(
        _Api(kube.NotFound("get", "gp-node-tuning", 404, "not found")))  # type: ignore[arg-type]
    assert missing == TuningSeen(missing=True)
    denied = await NodeTuningProbe(REF).observe(
        _Api(kube.Forbidden("get", "gp-node-tuning", 403, "forbidden")))  # type: ignore[arg-type]
    assert denied.daemonset is None
    assert not denied.missing
    assert "forbidden" in str(denied.error)
