"""Pure translation of an autoscaling step into what users see: the status fields, the Scaling
condition, Events, and the detection of another owner of the proxy replicas (an HPA)."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from gpuproxy_operator.api.base import KIND
from gpuproxy_operator.autoscaling.policy import Decision

CONDITION = "Scaling"
# Reasons after which the autoscaler is not doing its job; the first one gets a Warning Event.
# (DeploymentMissing and NoReadyPods are normal right after creation: condition only.)
WARNING_REASONS = frozenset({"MetricsUnavailable", "ReplicasOwnedElsewhere"})


def rfc3339(epoch: float) -> str:
    stamp = datetime.datetime.fromtimestamp(epoch, datetime.UTC)
    return stamp.isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one step observed and decided, in user terms."""

    able: bool
    reason: str
    message: str
    current_connections: int | None = None
    desired_replicas: int | None = None


def outcome_of(decision: Decision, deployment: str) -> Outcome:
    message = decision.message
    if decision.changed:
        message = (f"scaled Deployment {deployment} from {decision.current_replicas} to "
                   f"{decision.desired_replicas}: {message}")
    return Outcome(decision.able, decision.reason, message, decision.current_connections,
                   decision.desired_replicas)


def other_owner(autoscalers: list[dict[str, Any]], deployment: str, cluster: str) -> str | None:
    """The first HorizontalPodAutoscaler (KEDA's ScaledObjects create one too) whose target is
    the proxy Deployment or the GpuProxyCluster's scale subresource, as `namespace/name`."""
    for hpa in autoscalers:
        ref = (hpa.get("spec") or {}).get("scaleTargetRef") or {}
        kind, name = ref.get("kind"), ref.get("name")
        if (kind, name) in (("Deployment", deployment), (KIND, cluster)):
            meta = hpa.get("metadata") or {}
            return f"{meta.get('namespace', '')}/{meta.get('name', '?')}"
    return None


def scaling_condition(
    outcome: Outcome,
    previous: list[dict[str, Any]],
    generation: int | None,
    now: float,
) -> list[dict[str, Any]]:
    """The whole conditions list with Scaling set; other types are kept untouched (a merge
    patch replaces lists, so we must send them all)."""
    status = "True" if outcome.able else "False"
    old = next((c for c in previous if c.get("type") == CONDITION), None)
    transition = (old.get("lastTransitionTime") if old and old.get("status") == status
                  else None) or rfc3339(now)
    new: dict[str, Any] = {
        "type": CONDITION,
        "status": status,
        "reason": outcome.reason,
        "message": outcome.message[:1024],
        "lastTransitionTime": transition,
    }
    if generation is not None:
        new["observedGeneration"] = generation
    kept = [c for c in previous if c.get("type") != CONDITION]
    return [*kept, new]


def status_patch(
    outcome: Outcome,
    previous_status: dict[str, Any],
    generation: int | None,
    now: float,
    last_scale_time: float | None,
    state_json: str | None,
) -> dict[str, Any]:
    """The status merge patch of one step."""
    patch: dict[str, Any] = {
        "conditions": scaling_condition(
            outcome, list(previous_status.get("conditions") or []), generation, now),
    }
    if outcome.current_connections is not None:
        patch["currentConnections"] = outcome.current_connections
    if outcome.desired_replicas is not None:
        patch["desiredReplicas"] = outcome.desired_replicas
    if last_scale_time is not None:
        patch["lastScaleTime"] = rfc3339(last_scale_time)
    if state_json is not None:
        patch["autoscalerState"] = state_json
    return patch


def event_for(
    outcome: Outcome, decision: Decision | None, previous_reason: str | None
) -> tuple[str, str, str] | None:
    """(type, reason, message) of the Event to post, or None: one per scale action, and one
    Warning when the autoscaler starts failing for a new reason."""
    if decision is not None and decision.changed:
        up = decision.desired_replicas > decision.current_replicas
        return "Normal", "ScaledUp" if up else "ScaledDown", outcome.message
    if outcome.reason in WARNING_REASONS and outcome.reason != previous_reason:
        return "Warning", outcome.reason, outcome.message
    return None
