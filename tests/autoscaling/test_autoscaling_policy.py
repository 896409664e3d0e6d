"""Single decisions of the policy pinned to the HPA's numbers: rate limits, missing metrics,
bounds, state serialization."""

from __future__ import annotations

import pytest

from gpuproxy_operator.api.components import AutoscalingSpec, ScalingRules
from gpuproxy_operator.autoscaling.behavior import (
    longest_period,
    scale_down_limit,
    scale_up_limit,
    stabilize,
)
from gpuproxy_operator.autoscaling.policy import PodSample, decide, replica_bounds
from gpuproxy_operator.autoscaling.state import Recommendation, ScaleEvent, ScalerState

CPR = 100_000


def spec(**overrides: object) -> AutoscalingSpec:
    body: dict[str, object] = {"enabled": True, "minReplicas": 2, "maxReplicas": 20}
    body.update(overrides)
    return AutoscalingSpec.model_validate(body)


def pods(*counts: int | None) -> list[PodSample]:
    return [PodSample(f"p{i}", c) for i, c in enumerate(counts)]


def rules(select: str, *policies: tuple[str, int, int]) -> ScalingRules:
    return ScalingRules.model_validate({
        "stabilizationWindowSeconds": 0, "selectPolicy": select,
        "policies": [{"type": t, "value": v, "periodSeconds": p} for t, v, p in policies],
    })


@pytest.mark.parametrize(("current", "select", "expected"), [
    (2, "Max", 6),     # max(+4 pods, +100%) from 2
    (10, "Max", 20),   # +100% wins from 10
    (10, "Min", 14),   # the smaller change
    (10, "Disabled", 10),
])
def test_scale_up_limit(current: int, select: str, expected: int) -> None:
    r = rules(select, ("Percent", 100, 15), ("Pods", 4, 15))
    assert scale_up_limit(current, (), r, now=100) == expected


def test_scale_up_limit_counts_from_the_start_of_the_period() -> None:
    r = rules("Max", ("Pods", 2, 60))
    events = (ScaleEvent(50, 2),)  # 2 pods added 50 s ago: the period started at 4
    assert scale_up_limit(6, events, r, now=100) == 6
    assert scale_up_limit(6, events, r, now=111) == 8  # that event left the 60 s period


@pytest.mark.parametrize(("select", "expected"), [("Max", 5), ("Min", 9), ("Disabled", 10)])
def test_scale_down_limit(select: str, expected: int) -> None:
    r = rules(select, ("Percent", 50, 15), ("Pods", 1, 15))
    assert scale_down_limit(10, (), r, now=100) == expected


def test_bounds_follow_target_connections() -> None:
    # 1M at 80k per replica needs 13; maxReplicas 20 does not matter, 10 does.
    assert replica_bounds(spec(targetConnections=1_000_000), CPR) == (2, 13)
    assert replica_bounds(spec(targetConnections=1_000_000, maxReplicas=10), CPR) == (2, 10)
    # A tiny target never pushes the upper bound below minReplicas.
    assert replica_bounds(spec(targetConnections=1), CPR) == (2, 2)


def test_too_few_replicas_are_corrected_at_once() -> None:
    low = decide(spec(), CPR, 0, [], ScalerState(), now=0)
    assert (low.desired_replicas, low.reason) == (2, "TooFewReplicas")


def test_a_lowered_maximum_is_applied_at_the_scale_down_pace() -> None:
    # maxReplicas 20 -> 5 with 20 pods: the default policy removes max(1 pod, 10%) per 60 s,
    # whatever the metrics say, never waiting for the stabilization window.
    state, replicas, t = ScalerState(), 20, 0.0
    steps = []
    while replicas > 5:
        d = decide(spec(maxReplicas=5), CPR, replicas, pods(*[0] * replicas), state, now=t)
        assert d.reason == "TooManyReplicas"
        if d.changed:
            steps.append((t, replicas - d.desired_replicas))
        state, replicas, t = d.state, d.desired_replicas, t + 15
    # 10% of 20, 18, 16, 14 and 12 is 2 pods; below 10 pods, 1 pod; one step per 60 s.
    assert steps == [(0, 2), (60, 2), (120, 2), (180, 2), (240, 2), (300, 1), (360, 1),
                     (420, 1), (480, 1), (540, 1)]
    # A disabled scale-down is respected even then.
    disabled = spec(maxReplicas=5, behavior={"scaleDown": {"stabilizationWindowSeconds": 0,
                                                           "selectPolicy": "Disabled",
                                                           "policies": []}})
    d = decide(disabled, CPR, 9, pods(*[0] * 9), ScalerState(), now=0)
    assert (d.desired_replicas, d.reason) == (9, "TooManyReplicas")
    assert "disabled" in d.message


def test_no_metrics_at_all_holds_and_says_so() -> None:
    d = decide(spec(), CPR, 4, pods(None, None, None, None), ScalerState(), now=0)
    assert (d.desired_replicas, d.reason, d.able) == (4, "MetricsUnavailable", False)


def test_unanswered_pods_count_at_the_target_and_starting_pods_as_idle() -> None:
    # 3 pods at 100k and one whose /stats timed out: it is likely the busiest, so it counts at
    # the 80k target: 380k over 4 pods is 95k, above the 10% tolerance -> ceil(380k/80k) = 5.
    d = decide(spec(), CPR, 4, pods(100_000, 100_000, 100_000, None), ScalerState(), now=0)
    assert (d.desired_replicas, d.reason, d.pods_missing) == (5, "MetricsRecommendation", 1)
    assert "1 ready but unanswered" in d.message
    # The same pod not ready yet (starting: the Service sends it no clients) counts as idle:
    # 300k over 4 pods is 75k, no scale-up.
    starting = [*pods(100_000, 100_000, 100_000), PodSample("p3", None, ready=False)]
    d = decide(spec(), CPR, 4, starting, ScalerState(), now=0)
    assert (d.desired_replicas, d.reason) == (4, "MissingMetrics")
    # 3 pods at 150k with the fourth starting: 450k / 80k -> 6.
    starting = [*pods(150_000, 150_000, 150_000), PodSample("p3", None, ready=False)]
    d = decide(spec(), CPR, 4, starting, ScalerState(), now=0)
    assert (d.desired_replicas, d.reason) == (6, "MetricsRecommendation")
    # An unanswered pod next to idle ones never makes a scale-down.
    d = decide(spec(), CPR, 4, pods(0, 0, 0, None), ScalerState(), now=0)
    assert (d.desired_replicas, d.reason) == (4, "MissingMetrics")


def test_missing_pods_block_scale_down_even_without_windows() -> None:
    no_window = spec(behavior={"scaleDown": {"stabilizationWindowSeconds": 0, "policies": [
        {"type": "Percent", "value": 100, "periodSeconds": 15}]}})
    d = decide(no_window, CPR, 6, pods(0, 0, 0, 0, 0, None), ScalerState(), now=0)
    assert (d.desired_replicas, d.reason) == (6, "MissingMetrics")
    # Pods the Deployment should have but that are not listed yet count as missing too.
    d = decide(no_window, CPR, 6, pods(0, 0, 0), ScalerState(), now=0)
    assert (d.desired_replicas, d.pods_missing) == (6, 3)
    # Once every pod reports, it scales down at once.
    d = decide(no_window, CPR, 6, pods(0, 0, 0, 0, 0, 0), ScalerState(), now=0)
    assert d.desired_replicas == 2


def test_lost_state_never_scales_down_immediately() -> None:
    # Restarted with no memory and an idle cluster: the window starts at the current count.
    d = decide(spec(), CPR, 8, pods(*[0] * 8), ScalerState(), now=1000)
    assert (d.desired_replicas, d.reason) == (8, "ScaleDownStabilized")
    later = decide(spec(), CPR, 8, pods(*[0] * 8), d.state, now=1301)
    # Then one pod at a time (the default: max(1 pod, 10%) per 60 s).
    assert (later.desired_replicas, later.reason) == (7, "ScaleDownLimit")
    assert later.state.last_scale_time == 1301
    assert later.state.events == (ScaleEvent(1301, -1),)


def test_state_round_trips_and_tolerates_garbage() -> None:
    state = ScalerState((Recommendation(1.5, 3), Recommendation(16.5, 4)),
                        (ScaleEvent(16.5, 1),), 16.5)
    assert ScalerState.from_json(state.to_json()) == state
    for bad in (None, "", "{", "[]", '{"v":99}', '{"v":1,"r":[["x",1]]}'):
        assert ScalerState.from_json(bad) == ScalerState()


def test_state_is_pruned_to_the_windows() -> None:
    old = ScalerState(tuple(Recommendation(t, 3) for t in range(0, 1000, 15)),
                      tuple(ScaleEvent(t, 1) for t in range(0, 1000, 15)), 990)
    d = decide(spec(), CPR, 3, pods(200_000, 0, 0), old, now=1000)
    assert all(r.at > 700 for r in d.state.recommendations)
    assert all(e.at > 1000 - longest_period(spec().behavior) for e in d.state.events)
    assert len(d.state.to_json()) < 600


def test_a_steady_load_keeps_one_recommendation_and_decides_the_same() -> None:
    """Dominated recommendations are dropped (a later one at least as high and one at least as
    low): the state stops changing under a steady load, and no decision differs."""
    state = ScalerState((Recommendation(0, 5), Recommendation(15, 9), Recommendation(30, 4),
                         Recommendation(45, 7), Recommendation(60, 4)))
    assert [r.replicas for r in state.compacted().recommendations] == [9, 7, 4]
    behavior = spec().behavior
    for t in range(60, 400, 15):
        for want in range(1, 12):
            assert stabilize(want, 5, state.recommendations, behavior, t) == stabilize(
                want, 5, state.compacted().recommendations, behavior, t)
    steady = ScalerState()
    for t in range(0, 600, 15):
        steady = decide(spec(), CPR, 4, pods(*[300_000 // 4] * 4), steady, now=t).state
    assert [r.replicas for r in steady.recommendations] == [4]
