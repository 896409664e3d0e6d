"""Single decisions of the policy pinned to the HPA's numbers: rate limits, missing metrics,
bounds, state serialization."""

from __future__ import annotations

import pytest

from gpuproxy_operator.api.components import AutoscalingSpec, ScalingRules
from gpuproxy_operator.autoscaling.behavior import scale_down_limit, scale_up_limit
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


def test_out_of_range_replicas_are_corrected_at_once() -> None:
    low = decide(spec(), CPR, 0, [], ScalerState(), now=0)
    assert (low.desired_replicas, low.reason) == (2, "TooFewReplicas")
    high = decide(spec(maxReplicas=5), CPR, 9, pods(*[0] * 9), ScalerState(), now=0)
    assert (high.desired_replicas, high.reason) == (5, "TooManyReplicas")


def test_no_metrics_at_all_holds_and_says_so() -> None:
    d = decide(spec(), CPR, 4, pods(None, None, None, None), ScalerState(), now=0)
    assert (d.desired_replicas, d.reason, d.able) == (4, "MetricsUnavailable", False)


def test_missing_pods_count_as_idle_when_scaling_up() -> None:
    # 3 pods at 100k and one not ready: 300k over 4 pods is 75k < 80k, no scale-up needed.
    d = decide(spec(), CPR, 4, pods(100_000, 100_000, 100_000, None), ScalerState(), now=0)
    assert (d.desired_replicas, d.reason) == (4, "MissingMetrics")
    # 3 pods at 150k: even with the fourth idle that is 112k per pod, so 450k / 80k -> 6.
    d = decide(spec(), CPR, 4, pods(150_000, 150_000, 150_000, None), ScalerState(), now=0)
    assert (d.desired_replicas, d.reason, d.pods_missing) == (6, "MetricsRecommendation", 1)


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
    assert later.desired_replicas == 2
    assert later.state.last_scale_time == 1301
    assert later.state.events == (ScaleEvent(1301, -6),)


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
    assert all(e.at > 985 for e in d.state.events)
    assert len(d.state.to_json()) < 600
