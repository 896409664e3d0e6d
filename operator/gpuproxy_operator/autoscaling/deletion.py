"""Which proxy pods go first on a scale-down: `controller.kubernetes.io/pod-deletion-cost` from
each pod's live connections, set right before the replicas go down (the ReplicaSet controller
deletes not-ready pods first, then the lowest cost). Pure."""

from __future__ import annotations

from collections.abc import Sequence

from gpuproxy_operator.autoscaling.policy import PodSample
from gpuproxy_operator.kube import POD_DELETION_COST

MAX_COST = 2**31 - 1  # the annotation is an int32


def deletion_costs(samples: Sequence[PodSample]) -> dict[str, int]:
    """Pod name -> cost: its connections; a ready pod that did not answer is assumed busy and
    kept (the highest cost); a pod that is not ready has no clients (0)."""
    costs: dict[str, int] = {}
    for sample in samples:
        if sample.connections is not None:
            costs[sample.name] = min(sample.connections, MAX_COST)
        else:
            costs[sample.name] = MAX_COST if sample.ready else 0
    return costs


def changed_costs(costs: dict[str, int], current: dict[str, str | None]) -> dict[str, int]:
    """Only the pods whose annotation differs (one PATCH per pod that needs it)."""
    return {name: cost for name, cost in costs.items() if current.get(name) != str(cost)}


def cost_patch(cost: int) -> dict[str, object]:
    """The merge patch of one pod: that annotation only."""
    return {"metadata": {"annotations": {POD_DELETION_COST: str(cost)}}}
