"""An in-memory ScalingKube: one GpuProxyCluster, its proxy Deployment and a fake ReplicaSet
controller: pods take the next free address of a fixed list on scale-up, and on scale-down the
not-ready pods go first, then the lowest pod-deletion-cost, then the newest (as the real one)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gpuproxy_operator import kube


@dataclass(frozen=True)
class FakePod:
    name: str
    ip: str | None
    ready: bool
    phase: str = "Running"
    terminating: bool = False
    deletion_cost: str | None = None


def merge(into: dict[str, Any], patch: dict[str, Any]) -> None:
    """RFC 7386 merge patch, in place."""
    for key, value in patch.items():
        if value is None:
            into.pop(key, None)
        elif isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value


@dataclass
class FakeKube:
    body: dict[str, Any]
    pod_ips: list[str]
    replicas: int = 1
    deployment_exists: bool = True
    unready: set[str] = field(default_factory=set)  # addresses
    terminating: set[str] = field(default_factory=set)  # addresses, listed but not counted
    autoscalers: list[dict[str, Any]] = field(default_factory=list)
    replica_writes: list[int] = field(default_factory=list)
    status_writes: list[dict[str, Any]] = field(default_factory=list)
    events: list[tuple[str, str, str]] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    costs: dict[str, str] = field(default_factory=dict)  # pod name -> annotation
    cost_writes: list[tuple[str, int]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # addresses, in the order pods went
    live: list[int] | None = None  # indexes into pod_ips, oldest first

    @property
    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.body.setdefault("status", {})
        return status

    def condition(self, type_: str = "Scaling") -> dict[str, Any]:
        return next(c for c in self.status.get("conditions", []) if c["type"] == type_)

    def _name(self, index: int) -> str:
        return f"{self.body['metadata']['name']}-proxy-{index}"

    def _reconcile_pods(self) -> list[int]:
        """The ReplicaSet: as many pods as `replicas` (tests may set it directly)."""
        if self.live is None:
            self.live = list(range(min(self.replicas, len(self.pod_ips))))
        while len(self.live) < min(self.replicas, len(self.pod_ips)):
            self.live.append(next(i for i in range(len(self.pod_ips)) if i not in self.live))
        live = self.live
        while len(live) > self.replicas:
            gone = min(live, key=lambda i: (self.pod_ips[i] not in self.unready,
                                            int(self.costs.get(self._name(i), "0")),
                                            -live.index(i)))
            live.remove(gone)
            self.removed.append(self.pod_ips[gone])
        return live

    async def get_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls.append("get_deployment")
        if not self.deployment_exists:
            return None
        return {"metadata": {"name": name, "namespace": namespace},
                "spec": {"replicas": self.replicas}}

    async def list_proxy_pods(self, namespace: str, cluster: str) -> Sequence[FakePod]:
        self.calls.append("list_proxy_pods")
        pods = [FakePod(self._name(i), self.pod_ips[i], self.pod_ips[i] not in self.unready,
                        deletion_cost=self.costs.get(self._name(i)))
                for i in self._reconcile_pods()]
        pods += [FakePod(f"{cluster}-proxy-leaving-{n}", ip, False, terminating=True)
                 for n, ip in enumerate(sorted(self.terminating))]
        return pods

    async def list_autoscalers(self, namespace: str) -> list[dict[str, Any]]:
        self.calls.append("list_autoscalers")
        return self.autoscalers

    async def set_replicas(self, namespace: str, deployment: str, replicas: int) -> None:
        self.calls.append("set_replicas")
        self.replica_writes.append(replicas)
        self.replicas = replicas
        self._reconcile_pods()

    async def set_deletion_cost(self, namespace: str, pod: str, cost: int) -> None:
        self.calls.append("set_deletion_cost")
        self.cost_writes.append((pod, cost))
        self.costs[pod] = str(cost)

    async def get_cluster(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls.append("get_cluster")
        return copy.deepcopy(self.body)

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any],
                           resource_version: str | None) -> None:
        """Like the API server: a stale resourceVersion is a 409; a write bumps it."""
        self.calls.append("patch_status")
        meta = self.body.setdefault("metadata", {})
        if resource_version is not None and resource_version != meta.get("resourceVersion"):
            raise kube.Conflict("patch", f"GpuProxyCluster {namespace}/{name}", 409,
                                "the object has been modified")
        self.status_writes.append(status)
        merge(self.status, status)
        meta["resourceVersion"] = str(int(meta.get("resourceVersion") or 0) + 1)

    async def post_event(self, body: dict[str, Any], type_: str, reason: str,
                         message: str) -> None:
        self.calls.append("post_event")
        self.events.append((type_, reason, message))
