"""An in-memory ScalingKube: one GpuProxyCluster, its proxy Deployment and a fake Deployment
controller whose pods are the first `replicas` of a fixed list of addresses."""

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
    unready: set[str] = field(default_factory=set)
    autoscalers: list[dict[str, Any]] = field(default_factory=list)
    replica_writes: list[int] = field(default_factory=list)
    status_writes: list[dict[str, Any]] = field(default_factory=list)
    events: list[tuple[str, str, str]] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)

    @property
    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.body.setdefault("status", {})
        return status

    def condition(self, type_: str = "Scaling") -> dict[str, Any]:
        return next(c for c in self.status.get("conditions", []) if c["type"] == type_)

    async def get_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls.append("get_deployment")
        if not self.deployment_exists:
            return None
        return {"metadata": {"name": name, "namespace": namespace},
                "spec": {"replicas": self.replicas}}

    async def list_proxy_pods(self, namespace: str, cluster: str) -> Sequence[FakePod]:
        self.calls.append("list_proxy_pods")
        return [FakePod(f"{cluster}-proxy-{i}", ip, ip not in self.unready)
                for i, ip in enumerate(self.pod_ips[: self.replicas])]

    async def list_autoscalers(self, namespace: str) -> list[dict[str, Any]]:
        self.calls.append("list_autoscalers")
        return self.autoscalers

    async def set_replicas(self, namespace: str, deployment: str, replicas: int) -> None:
        self.calls.append("set_replicas")
        self.replica_writes.append(replicas)
        self.replicas = replicas

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
