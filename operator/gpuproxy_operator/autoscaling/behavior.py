"""The HorizontalPodAutoscaler's `behavior` for one scaling decision: stabilization windows over
past recommendations, then the Pods/Percent rate policies over past scale events. Pure."""

from __future__ import annotations

import math
from dataclasses import dataclass

from gpuproxy_operator.api.components import ScalingBehavior, ScalingRules
from gpuproxy_operator.autoscaling.state import Recommendation, ScaleEvent


@dataclass(frozen=True, slots=True)
class Limited:
    """A replica count after one normalization step and why it is what it is."""

    replicas: int
    reason: str
    message: str


def longest_window(behavior: ScalingBehavior) -> int:
    """Seconds of recommendations any decision can still look at."""
    return max(
        behavior.scale_up.stabilization_window_seconds,
        behavior.scale_down.stabilization_window_seconds,
    )


def longest_period(behavior: ScalingBehavior) -> int:
    """Seconds of scale events any rate policy can still count."""
    periods = [p.period_seconds for p in behavior.scale_up.policies]
    periods += [p.period_seconds for p in behavior.scale_down.policies]
    return max(periods, default=0)


def stabilize(
    desired: int,
    current: int,
    history: tuple[Recommendation, ...],
    behavior: ScalingBehavior,
    now: float,
) -> Limited:
    """Scale up only to the lowest and down only to the highest recommendation of the
    respective window (the current one included), as the HPA does."""
    up_cutoff = now - behavior.scale_up.stabilization_window_seconds
    down_cutoff = now - behavior.scale_down.stabilization_window_seconds
    up = min([desired, *(r.replicas for r in history if r.at > up_cutoff)])
    down = max([desired, *(r.replicas for r in history if r.at > down_cutoff)])
    result = max(current, up)
    result = min(result, down)
    if result == desired:
        return Limited(result, "ScaleDesired", "the recommendation is stable")
    if result < desired:
        return Limited(
            result,
            "ScaleUpStabilized",
            "recent recommendations were lower than the current one, applying the lowest "
            f"of the last {behavior.scale_up.stabilization_window_seconds}s",
        )
    return Limited(
        result,
        "ScaleDownStabilized",
        "recent recommendations were higher than the current one, applying the highest "
        f"of the last {behavior.scale_down.stabilization_window_seconds}s",
    )


def _changes_within(period: int, events: tuple[ScaleEvent, ...], now: float) -> tuple[int, int]:
    cutoff = now - period
    added = sum(e.change for e in events if e.at > cutoff and e.change > 0)
    removed = sum(-e.change for e in events if e.at > cutoff and e.change < 0)
    return added, removed


def scale_up_limit(
    current: int, events: tuple[ScaleEvent, ...], rules: ScalingRules, now: float
) -> int:
    """Highest replica count the scale-up policies allow now (HPA semantics: each policy
    counts from the replicas at the start of its period)."""
    if rules.select_policy == "Disabled" or not rules.policies:
        return current
    proposals = []
    for policy in rules.policies:
        added, removed = _changes_within(policy.period_seconds, events, now)
        start = current - added + removed
        if policy.type == "Pods":
            proposals.append(start + policy.value)
        else:
            # Rounded up, or a Percent policy could never add a pod to a small Deployment.
            proposals.append(math.ceil(start * (1 + policy.value / 100)))
    return min(proposals) if rules.select_policy == "Min" else max(proposals)


def scale_down_limit(
    current: int, events: tuple[ScaleEvent, ...], rules: ScalingRules, now: float
) -> int:
    """Lowest replica count the scale-down policies allow now."""
    if rules.select_policy == "Disabled" or not rules.policies:
        return current
    proposals = []
    for policy in rules.policies:
        added, removed = _changes_within(policy.period_seconds, events, now)
        start = current - added + removed
        if policy.type == "Pods":
            proposals.append(start - policy.value)
        else:
            proposals.append(math.floor(start * (1 - policy.value / 100)))
    # For scale-down the "Min" policy is the smallest change, i.e. the highest count.
    return max(proposals) if rules.select_policy == "Min" else min(proposals)


def rate_limit(
    desired: int,
    current: int,
    lower: int,
    upper: int,
    events: tuple[ScaleEvent, ...],
    behavior: ScalingBehavior,
    now: float,
) -> Limited:
    """Bring `desired` within [lower, upper] and within what the rate policies allow."""
    if desired > current:
        limit = max(scale_up_limit(current, events, behavior.scale_up, now), current)
        if limit < upper:
            if desired > limit:
                disabled = behavior.scale_up.select_policy == "Disabled"
                return Limited(
                    limit,
                    "ScaleUpDisabled" if disabled else "ScaleUpLimit",
                    "scale-up is disabled by behavior.scaleUp.selectPolicy"
                    if disabled
                    else "the desired replica count is increasing faster than the maximum "
                    "scale rate of behavior.scaleUp.policies",
                )
        elif desired > upper:
            return Limited(upper, "TooManyReplicas", "the desired count is above the maximum")
    elif desired < current:
        limit = min(scale_down_limit(current, events, behavior.scale_down, now), current)
        if limit > lower:
            if desired < limit:
                disabled = behavior.scale_down.select_policy == "Disabled"
                return Limited(
                    limit,
                    "ScaleDownDisabled" if disabled else "ScaleDownLimit",
                    "scale-down is disabled by behavior.scaleDown.selectPolicy"
                    if disabled
                    else "the desired replica count is decreasing faster than the maximum "
                    "scale rate of behavior.scaleDown.policies",
                )
        elif desired < lower:
            return Limited(lower, "TooFewReplicas", "the desired count is below the minimum")
    return Limited(desired, "DesiredWithinRange", "the desired count is within the allowed range")
