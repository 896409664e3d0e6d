"""One owner of the proxy replicas at a time, stated in status: an external HorizontalPodAutoscaler
on the Deployment (left alone), else the autoscaler when enabled, else spec.proxy.replicas; and
the count reconcile may put in the Deployment. Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from gpuproxy_operator.api.base import KIND
from gpuproxy_operator.api.cluster import GpuProxyCluster
from gpuproxy_operator.api.proxy import ProxySpec
from gpuproxy_operator.naming import child_name

Owner = Literal["Autoscaler", "Spec", "External"]
OWNER_FIELD = "replicasOwner"
MESSAGE_FIELD = "replicasOwnerMessage"
HANDOVER_FIELD = "handoverSpecReplicas"
SCALE_HINT = "kubectl scale gpc {name} --replicas N"


@dataclass(frozen=True, slots=True)
class Autoscalers:
    """HorizontalPodAutoscalers (KEDA's ScaledObjects create one too) by target, as ns/name."""

    on_deployment: str | None = None
    on_cluster: str | None = None  # through the GpuProxyCluster's scale subresource


def find_autoscalers(hpas: Sequence[Mapping[str, Any]], deployment: str,
                     cluster: str) -> Autoscalers:
    on_deployment = on_cluster = None
    for hpa in hpas:
        ref = (hpa.get("spec") or {}).get("scaleTargetRef") or {}
        meta = hpa.get("metadata") or {}
        label = f"{meta.get('namespace', '')}/{meta.get('name', '?')}"
        if (ref.get("kind"), ref.get("name")) == ("Deployment", deployment):
            on_deployment = on_deployment or label
        elif (ref.get("kind"), ref.get("name")) == (KIND, cluster):
            on_cluster = on_cluster or label
    return Autoscalers(on_deployment, on_cluster)


@dataclass(frozen=True, slots=True)
class Ownership:
    """Who owns the replicas, why (for a person), the handover memory, the count reconcile
    builds the Deployment with, and an Event to post (an owner change, an ignored scale)."""

    owner: Owner
    message: str
    handover: int | None
    replicas: int
    event: tuple[str, str, str] | None = None

    def status_fields(self) -> dict[str, Any]:
        """camelCase status fields; a None handover is sent as null, which removes it."""
        return {OWNER_FIELD: self.owner, MESSAGE_FIELD: self.message,
                HANDOVER_FIELD: self.handover}


def _owner(cluster: GpuProxyCluster, found: Autoscalers) -> tuple[Owner, str]:
    spec, name = cluster.spec, cluster.metadata.name
    wanted, auto = spec.proxy.replicas, spec.autoscaling
    deployment = child_name(name, "proxy")
    if found.on_deployment:
        both = ("; spec.autoscaling.enabled is true too: delete that HorizontalPodAutoscaler or "
                "set spec.autoscaling.enabled to false" if auto.enabled else "")
        return "External", (f"HorizontalPodAutoscaler {found.on_deployment} scales Deployment "
                            f"{deployment}; the operator leaves its replicas alone "
                            f"(spec.proxy.replicas {wanted} is not applied){both}")
    if auto.enabled and found.on_cluster:
        return "External", (f"HorizontalPodAutoscaler {found.on_cluster} scales this {KIND} "
                            "while spec.autoscaling.enabled is true: the operator changes no "
                            "replicas until one of them is removed")
    if auto.enabled:
        return "Autoscaler", (f"the autoscaler sets the replicas within minReplicas "
                              f"{auto.min_replicas} and maxReplicas {auto.max_replicas} "
                              f"(spec.autoscaling); spec.proxy.replicas ({wanted}) is ignored "
                              "while it is enabled")
    via = (f", set by HorizontalPodAutoscaler {found.on_cluster} through the scale subresource"
           if found.on_cluster else f" ({SCALE_HINT.format(name=name)})")
    return "Spec", f"spec.proxy.replicas ({wanted}){via}"


def resolve(cluster: GpuProxyCluster, previous: Mapping[str, Any], found: Autoscalers,
            observed: int | None) -> Ownership:
    """The owner now, from the spec, the previous status (owner and handover memory), the
    autoscalers found and the Deployment's current replicas (None: it does not exist)."""
    spec = cluster.spec
    wanted, auto = spec.proxy.replicas, spec.autoscaling
    owner, message = _owner(cluster, found)
    before = previous.get(OWNER_FIELD)
    remembered = previous.get(HANDOVER_FIELD)
    remembered = remembered if isinstance(remembered, int) else None
    event: tuple[str, str, str] | None = None
    if before is not None and before != owner:
        event = ("Normal", "ReplicasOwnerChanged", f"proxy replicas: {owner} ({message})")

    if owner != "Spec":
        if before == owner and remembered is not None and remembered != wanted:
            event = ("Warning", "ScaleIgnored",
                     f"spec.proxy.replicas changed from {remembered} to {wanted} (kubectl scale "
                     f"gpc?), which is ignored: {message}")
        if observed is not None:
            return Ownership(owner, message, wanted, observed, event)
        initial = wanted
        desired = previous.get("desiredReplicas")
        if owner == "Autoscaler":
            # A re-created Deployment starts where the autoscaler last was, within its bounds.
            if isinstance(desired, int) and desired > 0:
                initial = desired
            initial = min(max(initial, auto.min_replicas), auto.max_replicas)
        return Ownership(owner, message, wanted, initial, event)

    # Spec: after a handover, the count the previous owner left stays until spec.proxy.replicas
    # is changed (a value from before the handover is stale; one set in the very edit that
    # hands over is not). The operator never writes spec.
    handover: int | None
    if before in ("Autoscaler", "External"):
        handover = remembered if remembered is not None else wanted
    else:
        handover = remembered if before == "Spec" else None
    if handover != wanted:
        handover = None
    if observed is None or observed == wanted:
        return Ownership(owner, message, None, wanted, event)
    if handover is not None:
        return Ownership(owner, f"{message}; the Deployment keeps the {observed} replicas it had "
                         f"when spec.proxy.replicas took over, until spec.proxy.replicas changes",
                         handover, observed, event)
    if wanted < observed:
        # Removing pods drops their clients: the autoscaling loop steps down at the pace of
        # spec.autoscaling.behavior.scaleDown, removing the least loaded pods first.
        return Ownership(owner, f"{message}; scaling down from {observed} at the pace of "
                         "spec.autoscaling.behavior.scaleDown.policies", None, observed, event)
    return Ownership(owner, message, None, wanted, event)


def descent_pending(body: Mapping[str, Any]) -> bool:
    """Whether a spec.proxy.replicas scale-down is left to the autoscaling loop, from the
    status reconcile wrote (owner Spec, no handover, more pods than spec.proxy.replicas)."""
    status = body.get("status") or {}
    if status.get(OWNER_FIELD) != "Spec" or status.get(HANDOVER_FIELD) is not None:
        return False
    default = ProxySpec.model_fields["replicas"].default
    wanted = ((body.get("spec") or {}).get("proxy") or {}).get("replicas", default)
    have = status.get("replicas")
    return isinstance(have, int) and isinstance(wanted, int) and have > wanted
