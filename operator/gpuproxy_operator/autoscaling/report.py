"""Pure translation of an autoscaling step into what users see: the status fields (written only
when something significant changed), the Scaling condition and Events."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gpuproxy_operator.autoscaling.policy import Decision

CONDITION = "Scaling"
# Reasons after which the autoscaler is not doing its job; the first one gets a Warning Event.
# (DeploymentMissing and NoReadyPods are normal right after creation: condition only.)
WARNING_REASONS = frozenset({"MetricsUnavailable", "ReplicasOwnedElsewhere"})
DISABLED_MESSAGE = ("spec.autoscaling.enabled is false: status.replicasOwner and "
                    "replicasOwnerMessage say who sets the proxy replicas")


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


# Status fields the autoscaler owns; its Scaling condition is under CONDITION in a view.
FIELDS = ("currentConnections", "desiredReplicas", "lastScaleTime", "autoscalerState")
# A change of currentConnections worth a write on its own (relative); smaller ones, and message
# wording, wait for a write that happens anyway or for the refresh (loop.REFRESH_SECONDS).
CONNECTIONS_CHANGE = 0.05


def owned_view(status: Mapping[str, Any]) -> dict[str, Any]:
    """The autoscaler's part of a status, its Scaling condition under CONDITION."""
    view = {k: status.get(k) for k in FIELDS}
    view[CONDITION] = next((c for c in status.get("conditions") or []
                            if isinstance(c, dict) and c.get("type") == CONDITION), None)
    return view


def wanted_view(
    outcome: Outcome,
    old: Mapping[str, Any],
    generation: int | None,
    now: float,
    last_scale_time: float | None,
    state_json: str | None,
) -> dict[str, Any]:
    """What the autoscaler's part should say after this step (None: leave as it is)."""
    previous = [old[CONDITION]] if old.get(CONDITION) else []
    return {
        "currentConnections": outcome.current_connections,
        "desiredReplicas": outcome.desired_replicas,
        "lastScaleTime": rfc3339(last_scale_time) if last_scale_time is not None else None,
        "autoscalerState": state_json,
        CONDITION: scaling_condition(outcome, previous, generation, now)[-1],
    }


def _significant(new: Mapping[str, Any], old: Mapping[str, Any]) -> bool:
    """A change a reader acts on: the condition's status, reason or generation, the decision,
    a scale, a checkpoint, or a clear move of the connection count."""
    def key(c: Mapping[str, Any] | None) -> tuple[Any, ...]:
        c = c or {}
        return c.get("status"), c.get("reason"), c.get("observedGeneration")

    if key(new[CONDITION]) != key(old.get(CONDITION)):
        return True
    for name in ("desiredReplicas", "lastScaleTime", "autoscalerState"):
        if new[name] is not None and new[name] != old.get(name):
            return True
    conns, before = new["currentConnections"], old.get("currentConnections")
    if conns is None or conns == before:
        return False
    return not isinstance(before, int) or abs(conns - before) > CONNECTIONS_CHANGE * max(
        conns, before)


def status_changes(new: Mapping[str, Any], old: Mapping[str, Any],
                   refresh_due: bool) -> dict[str, Any] | None:
    """The fields of `new` to write (the Scaling condition under CONDITION), or None: nothing
    significant changed and the refresh is not due, so a steady cluster costs no writes."""
    changed = {k: v for k, v in new.items() if v is not None and v != old.get(k)}
    if not changed or not (refresh_due or _significant(new, old)):
        return None
    return changed


def status_patch(changes: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch of `changes` on the current status: a condition goes in as the whole
    conditions list (a merge patch replaces lists), other writers' conditions kept."""
    patch = {k: v for k, v in changes.items() if k != CONDITION}
    if CONDITION in changes:
        kept = [c for c in current.get("conditions") or [] if c.get("type") != CONDITION]
        patch["conditions"] = [*kept, changes[CONDITION]]
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
