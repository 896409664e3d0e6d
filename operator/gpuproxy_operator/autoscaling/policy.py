"""The pure scaling policy: from per-pod connection counts, the current replicas and the past
(ScalerState) to the replicas to run now, with the HorizontalPodAutoscaler's algorithm."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from gpuproxy_operator.api.components import AutoscalingSpec, ScalingBehavior
from gpuproxy_operator.autoscaling.behavior import (
    longest_period,
    longest_window,
    rate_limit,
    scale_down_limit,
    stabilize,
)
from gpuproxy_operator.autoscaling.state import ScaleEvent, ScalerState


@dataclass(frozen=True, slots=True)
class PodSample:
    """One proxy pod as the scraper saw it; `connections` is None when the pod is not ready
    (then `ready` is False) or its /stats could not be read in time."""

    name: str
    connections: int | None
    ready: bool = True


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one autoscaling step."""

    current_replicas: int
    desired_replicas: int
    recommended_replicas: int | None  # from the metrics alone; None without any metrics
    current_connections: int  # sum over the pods that answered
    pods_reporting: int
    pods_missing: int
    reason: str  # CamelCase, for the Scaling condition
    message: str
    state: ScalerState
    able: bool = True  # False when the autoscaler could not compute anything (no metrics)

    @property
    def changed(self) -> bool:
        return self.desired_replicas != self.current_replicas


def per_replica_target(spec: AutoscalingSpec, connections_per_replica: int) -> float:
    """Connections one replica should carry: connectionsPerReplica minus the headroom."""
    return connections_per_replica * (100 - spec.headroom_percent) / 100


def replica_bounds(spec: AutoscalingSpec, connections_per_replica: int) -> tuple[int, int]:
    """[minReplicas, min(maxReplicas, replicas targetConnections needs)], the upper bound never
    below minReplicas."""
    needed = math.ceil(spec.target_connections / per_replica_target(spec, connections_per_replica))
    return spec.min_replicas, max(spec.min_replicas, min(spec.max_replicas, needed))


def count_missing(current: int, samples: Sequence[PodSample]) -> int:
    """Pods without a reading, plus pods the Deployment should have but that are not listed."""
    return sum(1 for s in samples if s.connections is None) + max(0, current - len(samples))


def _recommend(
    spec: AutoscalingSpec, target: float, current: int, samples: Sequence[PodSample]
) -> tuple[int, str, str]:
    """Replicas the connection counts ask for, with our rules for missing metrics."""
    known = [s.connections for s in samples if s.connections is not None]
    missing = count_missing(current, samples)
    total = sum(known)
    tolerance = spec.tolerance_percent / 100
    ratio = total / (len(known) * target)
    raw = math.ceil(total / target)
    detail = f"{total} connections on {len(known)} pods, target {target:g} per replica"
    if missing == 0:
        if abs(ratio - 1) <= tolerance:
            band = f"usage ratio {ratio:.2f} is within the {spec.tolerance_percent}% tolerance"
            return current, "WithinTolerance", f"{detail}: {band}"
        return raw, "MetricsRecommendation", f"{detail}: {raw} replicas recommended"
    # A ready pod that does not answer is likely the busiest (a saturated event loop answers
    # /stats last): it counts as at the target. Pods not ready or not listed yet are starting
    # and have no clients (the Service sends them none), so they count as idle.
    unanswered = sum(1 for s in samples if s.connections is None and s.ready)
    unseen = f"{missing} pods not reporting ({unanswered} ready but unanswered, counted at the " \
             "target; the others starting, counted as idle)"
    estimate = total + unanswered * target
    all_ratio = estimate / ((len(known) + missing) * target)
    wanted = math.ceil(estimate / target)
    if all_ratio > 1 + tolerance and wanted > current:
        return wanted, "MetricsRecommendation", f"{detail}; {unseen}: {wanted} replicas"
    # Never shrink while a pod cannot be seen: its clients may be exactly the ones that need
    # a home (the HPA would assume it at the target and could scale down).
    return current, "MissingMetrics", f"{detail}; {unseen}: no scale-down until all report"


class _Result(Protocol):
    def __call__(self, desired: int, recommended: int | None, reason: str, message: str,
                 new_state: ScalerState, able: bool = True) -> Decision: ...


def _result_of(current: int, samples: Sequence[PodSample], now: float) -> _Result:
    """The Decision builder of one step: a change of replicas is recorded as a scale event."""
    known = [s.connections for s in samples if s.connections is not None]
    missing = count_missing(current, samples)

    def result(desired: int, recommended: int | None, reason: str, message: str,
               new_state: ScalerState, able: bool = True) -> Decision:
        if desired != current:
            new_state = ScalerState(new_state.recommendations,
                                    (*new_state.events, ScaleEvent(now, desired - current)), now)
        return Decision(current, desired, recommended, sum(known), len(known), missing,
                        reason, message, new_state, able)

    return result


def descend(
    behavior: ScalingBehavior,
    target: int,
    current_replicas: int,
    samples: Sequence[PodSample],
    state: ScalerState,
    now: float,
) -> Decision:
    """One step towards `target` (spec.proxy.replicas, autoscaling off) from above, at the pace
    of the scale-down policies; no stabilization window: a person asked for this count."""
    state = state.pruned(now, 0, longest_period(behavior))
    result = _result_of(current_replicas, samples, now)
    if current_replicas <= target:
        return result(current_replicas, target, "AtSpecReplicas",
                      f"{current_replicas} replicas, as spec.proxy.replicas says", state)
    limit = min(scale_down_limit(current_replicas, state.events, behavior.scale_down, now),
                current_replicas)
    desired = max(target, limit)
    what = f"spec.proxy.replicas is {target}, the Deployment has {current_replicas}"
    if desired == current_replicas:
        disabled = behavior.scale_down.select_policy == "Disabled"
        return result(current_replicas, target, "ScaleDownDisabled" if disabled
                      else "ScaleDownLimit",
                      f"{what}: scale-down is disabled by behavior.scaleDown.selectPolicy"
                      if disabled else f"{what}: waiting for behavior.scaleDown.policies to "
                      "allow the next step", state)
    return result(desired, target, "SpecScaleDown",
                  f"{what}: stepping down at the pace of spec.autoscaling.behavior.scaleDown."
                  "policies", state)


def decide(
    spec: AutoscalingSpec,
    connections_per_replica: int,
    current_replicas: int,
    samples: Sequence[PodSample],
    state: ScalerState,
    now: float,
) -> Decision:
    """One autoscaling step at time `now` (seconds, any monotonic origin shared with `state`)."""
    behavior = spec.behavior
    if not state.recommendations and behavior.scale_down.stabilization_window_seconds > 0:
        # No memory (first run, lost state): as the HPA, start the scale-down window at the
        # current count so a restart never causes an immediate scale-down.
        state = state.with_recommendation(now, current_replicas)
    state = state.pruned(now, longest_window(behavior), longest_period(behavior))
    lower, upper = replica_bounds(spec, connections_per_replica)
    target = per_replica_target(spec, connections_per_replica)
    result = _result_of(current_replicas, samples, now)

    if current_replicas < lower:
        return result(lower, None, "TooFewReplicas",
                      f"{current_replicas} replicas is below minReplicas {lower}", state)
    if current_replicas > upper:
        # A lowered bound is applied at the scale-down policies' pace, like any scale-down:
        # each removed pod drops its clients.
        limit = min(scale_down_limit(current_replicas, state.events, behavior.scale_down, now),
                    current_replicas)
        pace = ("scale-down is disabled by behavior.scaleDown.selectPolicy"
                if behavior.scale_down.select_policy == "Disabled"
                else "scaling down at the pace of behavior.scaleDown.policies")
        return result(max(upper, limit), None, "TooManyReplicas",
                      f"{current_replicas} replicas is above the maximum {upper} (maxReplicas "
                      f"and what targetConnections needs); {pace}", state)
    if all(s.connections is None for s in samples):
        return result(current_replicas, None, "MetricsUnavailable",
                      f"none of the {len(samples)} proxy pods reported connections; holding "
                      f"{current_replicas} replicas", state, able=False)

    unclamped, reason, message = _recommend(spec, target, current_replicas, samples)
    raw = min(max(unclamped, lower), upper)
    stable = stabilize(raw, current_replicas, state.recommendations, behavior, now)
    state = state.with_recommendation(now, raw).compacted()
    limited = rate_limit(stable.replicas, current_replicas, lower, upper, state.events,
                         behavior, now)
    if limited.reason != "DesiredWithinRange":
        reason, message = limited.reason, f"{message}; {limited.message}"
    elif stable.reason != "ScaleDesired":
        reason, message = stable.reason, f"{message}; {stable.message}"
    elif unclamped > upper:
        reason = "AtMaximum"
        message += f"; capped at {upper} (maxReplicas and what targetConnections needs)"
    elif unclamped < lower:
        reason = "AtMinimum"
        message += f"; kept at minReplicas {lower}"
    return result(limited.replicas, raw, reason, message, state)
