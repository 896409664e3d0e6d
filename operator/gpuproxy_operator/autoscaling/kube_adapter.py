"""The autoscaler's Kubernetes calls (the ScalingKube protocol) on the operator's KubeClient."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gpuproxy_operator import kube
from gpuproxy_operator.autoscaling.deletion import cost_patch
from gpuproxy_operator.autoscaling.scrape import Pod

# Not in kube.REGISTRY: only the autoscaler reads HPAs, to avoid fighting one.
HPA = kube.ResourceKind("HorizontalPodAutoscaler", "autoscaling", "v2",
                        "horizontalpodautoscalers")


async def list_autoscalers(client: kube.KubeClient, namespace: str) -> list[dict[str, Any]]:
    """The namespace's HPAs; none when the API or the RBAC to read it is missing (then nothing
    can be seen to conflict with)."""
    try:
        result = await client.request("list", HPA, namespace)
    except (kube.MissingAPI, kube.Forbidden):
        return []
    items: list[dict[str, Any]] = result.get("items") or []
    return items


@dataclass(frozen=True)
class KubeScaling:
    """ScalingKube over kube.KubeClient."""

    client: kube.KubeClient

    async def get_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self.client.get("Deployment", namespace, name)
        except kube.NotFound:
            return None

    async def list_proxy_pods(self, namespace: str, cluster: str) -> Sequence[Pod]:
        return await kube.list_component_pods(self.client, namespace, cluster, "proxy")

    async def list_autoscalers(self, namespace: str) -> list[dict[str, Any]]:
        return await list_autoscalers(self.client, namespace)

    async def set_deletion_cost(self, namespace: str, pod: str, cost: int) -> None:
        await self.client.patch("Pod", namespace, pod, cost_patch(cost))

    async def set_replicas(self, namespace: str, deployment: str, replicas: int) -> None:
        await kube.patch_deployment_replicas(self.client, namespace, deployment, replicas)

    async def get_cluster(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self.client.get(kube.CLUSTER.kind, namespace, name)
        except kube.NotFound:
            return None

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any],
                           resource_version: str | None) -> None:
        await kube.patch_cluster_status(self.client, namespace, name, status,
                                        resource_version=resource_version)

    async def post_event(self, body: dict[str, Any], type_: str, reason: str,
                         message: str) -> None:
        await kube.post_event(self.client, body, type_, reason, message)
