"""Trace-driven simulations of the pure policy: ramps, spikes, noisy plateaus, missing data,
rate limits and restarts, over simulated time (no test waits)."""

from __future__ import annotations

import itertools
import random

from tests.autoscaling.sim import Simulation, Tick, changes, ramp

from gpuproxy_operator.api.components import AutoscalingSpec, ScalingBehavior

CPR = 100_000  # connections per replica; with 20% headroom the target is 80k per replica
INTERVAL = 15.0


def spec(**overrides: object) -> AutoscalingSpec:
    body: dict[str, object] = {"enabled": True, "minReplicas": 2, "maxReplicas": 20,
                               "targetConnections": 1_000_000}
    body.update(overrides)
    return AutoscalingSpec.model_validate(body)


def recommended(ticks: list[Tick]) -> list[tuple[float, int]]:
    return [(k.t, k.decision.recommended_replicas) for k in ticks
            if k.decision.recommended_replicas is not None]


def test_ramp_to_a_million_and_back() -> None:
    # 0 -> 1M over 30 min, 10 min plateau, 1M -> 0 over 30 min, 20 min idle; pods need 30 s
    # to become ready after a scale-up.
    trace = ramp([(0, 0), (1800, 1_000_000), (2400, 1_000_000), (4200, 0), (5400, 0)])
    sim = Simulation(spec(), CPR, INTERVAL, ready_delay=30)
    ticks = sim.run(trace, 5400)

    # Bounds: never below min; never above what targetConnections needs (ceil(1M / 80k) = 13).
    assert all(2 <= k.decision.desired_replicas <= 13 for k in ticks)
    # Reaction: no ready pod ever carries more than connectionsPerReplica, and the plateau
    # is served within two intervals of reaching it by 12 replicas: 1M / 12 = 83k per
    # replica is within the 10% tolerance of the 80k target, so 13 is not needed.
    assert all(k.offered <= k.ready * CPR for k in ticks)
    at_plateau = [k for k in ticks if 1800 + 2 * INTERVAL <= k.t < 2400]
    assert {k.decision.desired_replicas for k in at_plateau} == {12}
    assert {k.decision.reason for k in at_plateau} == {"WithinTolerance"}
    # Scale-up is monotonic during the ramp up, scale-down monotonic during the ramp down.
    ups = [c for t, c in changes(ticks) if t <= 2400]
    downs = [c for t, c in changes(ticks) if t > 2400]
    assert all(c > 0 for c in ups)
    assert all(c < 0 for c in downs)
    # Every scale-down respects the 300 s window: no recommendation in the window was higher.
    recs = recommended(ticks)
    for k in ticks:
        if k.decision.desired_replicas < k.replicas:
            window = [r for t, r in recs if k.t - 300 < t <= k.t]
            assert max(window) <= k.decision.desired_replicas
    # The default scale-down pace: at most max(1 pod, 10%) per 60 s.
    down_ticks = [k for k in ticks if k.decision.desired_replicas < k.replicas]
    for k in down_ticks:
        assert k.replicas - k.decision.desired_replicas <= max(1, k.replicas // 10)
    assert all(b.t - a.t >= 60 for a, b in itertools.pairwise(down_ticks))
    # The first scale-down waits a full window after the last peak recommendation.
    last_peak = max(t for t, r in recs if r == 12)
    first_down = min(t for t, c in changes(ticks) if c < 0)
    assert first_down >= last_peak + 300
    # Back at minReplicas within the window (+ one interval) after the load is gone.
    back_at_min = min(k.t for k in ticks if k.t > 4200 and k.decision.desired_replicas == 2)
    assert back_at_min <= 4200 + 300 + INTERVAL


def test_spike_scales_up_within_two_intervals_and_down_gently_after_the_window() -> None:
    def trace(t: float) -> int:
        return 900_000 if 600 <= t < 645 else 200_000

    ticks = Simulation(spec(), CPR, INTERVAL).run(trace, 1800)
    acts = changes(ticks)
    # 200k needs 3 replicas; the spike needs ceil(900k / 80k) = 12. The default scale-up
    # policy (max of +100% and +4 pods per 15 s) gets there in two steps: 3 -> 7 -> 12.
    assert acts[0] == (0.0, 1)
    assert acts[1:3] == [(600.0, 4), (615.0, 5)]
    # Scale-down starts exactly when the 300 s window has passed the last recommendation of 12
    # (at 630 s), then goes back to 3 by at most max(1 pod, 10%) per 60 s.
    downs = acts[3:]
    assert downs[0] == (930.0, -2)  # floor(12 x 90%) = 10
    assert [c for _, c in downs] == [-2, -1, -1, -1, -1, -1, -1, -1]
    assert [t for t, _ in downs] == [930.0 + 60 * i for i in range(len(downs))]
    assert ticks[-1].decision.desired_replicas == 3
    assert {k.decision.reason for k in ticks if 645 <= k.t < 930} == {"ScaleDownStabilized"}


def test_noisy_plateau_does_not_oscillate() -> None:
    rng = random.Random(7)
    noise = {i: rng.uniform(-0.08, 0.08) for i in range(1000)}

    def trace(t: float) -> int:
        return round(500_000 * (1 + noise[int(t // INTERVAL)]))

    ticks = Simulation(spec(), CPR, INTERVAL).run(trace, 7200)
    acts = changes(ticks)
    assert all(c > 0 for _, c in acts), acts  # never a scale-down on the plateau
    assert len(acts) <= 2
    assert all(t < 600 for t, _ in acts)  # settled within 10 minutes, then stable for 1h50
    assert ticks[-1].decision.desired_replicas in (6, 7)


def test_tolerance_alone_holds_a_plateau_without_stabilization_windows() -> None:
    rng = random.Random(11)
    no_windows = ScalingBehavior.model_validate({
        "scaleUp": {"stabilizationWindowSeconds": 0,
                    "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}]},
        "scaleDown": {"stabilizationWindowSeconds": 0,
                      "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}]},
    })
    noise = [rng.uniform(-0.05, 0.05) for _ in range(500)]

    def trace(t: float) -> int:
        return round(480_000 * (1 + noise[int(t // INTERVAL)]))  # 6 x 80k, +-5%

    sim = Simulation(spec(behavior=no_windows), CPR, INTERVAL, start_replicas=6)
    assert changes(sim.run(trace, 3600)) == []


def test_rate_policies_bound_the_change_per_period() -> None:
    slow = ScalingBehavior.model_validate({
        "scaleUp": {"stabilizationWindowSeconds": 0,
                    "policies": [{"type": "Pods", "value": 2, "periodSeconds": 60}]},
        "scaleDown": {"stabilizationWindowSeconds": 60,
                      "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}]},
    })
    trace = ramp([(0, 0), (300, 1_000_000), (1200, 1_000_000), (1500, 0), (4000, 0)])
    ticks = Simulation(spec(behavior=slow), CPR, INTERVAL).run(trace, 4000)
    acts = changes(ticks)
    for t, _ in acts:
        window = [c for s, c in acts if t - 60 < s <= t]
        assert sum(c for c in window if c > 0) <= 2
        assert -sum(c for c in window if c < 0) <= 1
    # Slow, but it still gets there both ways.
    assert max(k.decision.desired_replicas for k in ticks) == 12
    assert ticks[-1].decision.desired_replicas == 2
    assert any(k.decision.reason == "ScaleUpLimit" for k in ticks)
    assert any(k.decision.reason == "ScaleDownLimit" for k in ticks)


def test_disabled_scale_down_never_shrinks() -> None:
    behavior = ScalingBehavior.model_validate({
        "scaleUp": {"stabilizationWindowSeconds": 0,
                    "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}]},
        "scaleDown": {"stabilizationWindowSeconds": 0, "selectPolicy": "Disabled",
                      "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}]},
    })
    trace = ramp([(0, 800_000), (600, 800_000), (601, 0), (2000, 0)])
    ticks = Simulation(spec(behavior=behavior), CPR, INTERVAL).run(trace, 2000)
    assert all(c > 0 for _, c in changes(ticks))
    assert ticks[-1].decision.desired_replicas == 10
    assert ticks[-1].decision.reason == "ScaleDownDisabled"


def test_bounds_hold_for_any_load() -> None:
    trace = ramp([(0, 0), (600, 3_000_000), (1200, 3_000_000), (1500, 0), (3000, 0)])
    ticks = Simulation(spec(maxReplicas=10), CPR, INTERVAL).run(trace, 3000)
    assert all(2 <= k.decision.desired_replicas <= 10 for k in ticks)
    assert any(k.decision.reason == "AtMaximum" for k in ticks)
    assert ticks[-1].decision.desired_replicas == 2


def test_no_scale_down_while_a_pod_cannot_be_read() -> None:
    trace = ramp([(0, 800_000), (600, 800_000), (900, 0), (3600, 0)])
    # Pod 0's /stats times out from t = 300 on, while the load drains to zero.
    sim = Simulation(spec(), CPR, INTERVAL, unreadable=lambda t, i: i == 0 and t >= 300)
    ticks = sim.run(trace, 3600)
    assert all(c > 0 for _, c in changes(ticks))
    late = [k for k in ticks if k.t > 1300]
    assert {k.decision.desired_replicas for k in late} == {10}
    assert {k.decision.reason for k in late} == {"MissingMetrics"}


def test_pods_starting_up_do_not_block_scale_up_and_count_as_idle() -> None:
    # A fast ramp while new pods take 90 s to become ready: the policy keeps scaling up
    # (counting starting pods as idle) and never scales down in between.
    trace = ramp([(0, 0), (300, 1_000_000), (1200, 1_000_000)])
    ticks = Simulation(spec(), CPR, INTERVAL, ready_delay=90).run(trace, 1200)
    assert all(c > 0 for _, c in changes(ticks))
    assert ticks[-1].decision.desired_replicas == 12


def test_state_survives_operator_restarts() -> None:
    def trace(t: float) -> int:
        return 900_000 if 600 <= t < 645 else 200_000

    plain = Simulation(spec(), CPR, INTERVAL).run(trace, 1800)
    restarted = Simulation(spec(), CPR, INTERVAL, restart_every=INTERVAL).run(trace, 1800)
    assert changes(restarted) == changes(plain)
