"""A trace-driven simulator of the pure scaling policy: a connection trace over simulated time,
a Deployment whose new pods become ready after a delay, and the policy deciding every interval."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from gpuproxy_operator.api.components import AutoscalingSpec
from gpuproxy_operator.autoscaling.policy import Decision, PodSample, decide
from gpuproxy_operator.autoscaling.state import ScalerState

Trace = Callable[[float], int]


@dataclass(frozen=True)
class Tick:
    t: float
    offered: int  # connections clients want to hold at t
    replicas: int  # before the decision
    ready: int
    decision: Decision


@dataclass
class Simulation:
    spec: AutoscalingSpec
    connections_per_replica: int = 100_000
    interval: float = 15.0
    ready_delay: float = 0.0  # seconds from scale-up until a new pod is ready
    start_replicas: int | None = None
    # (t, pod index) -> True when that pod's /stats cannot be read at t
    unreadable: Callable[[float, int], bool] = lambda t, i: False
    restart_every: float | None = None  # persist/reload state as a restarted operator would
    pods: list[float] = field(default_factory=list)  # ready time of each pod

    def run(self, trace: Trace, duration: float) -> list[Tick]:
        replicas = self.start_replicas if self.start_replicas is not None else (
            self.spec.min_replicas)
        self.pods = [0.0] * replicas
        state = ScalerState()
        ticks: list[Tick] = []
        t = 0.0
        last_restart = 0.0
        while t <= duration:
            offered = trace(t)
            samples = self._samples(t, offered)
            if self.restart_every is not None and t - last_restart >= self.restart_every:
                state = ScalerState.from_json(state.to_json())
                last_restart = t
            decision = decide(self.spec, self.connections_per_replica, replicas, samples,
                              state, t)
            ready = sum(1 for r in self.pods if r <= t)
            ticks.append(Tick(t, offered, replicas, ready, decision))
            state = decision.state
            self._scale(decision.desired_replicas, t)
            replicas = decision.desired_replicas
            t += self.interval
        return ticks

    def _samples(self, t: float, offered: int) -> list[PodSample]:
        ready = [i for i, r in enumerate(self.pods) if r <= t]
        samples = []
        for i, _ in enumerate(self.pods):
            if i not in ready:
                samples.append(PodSample(f"p{i}", None, ready=False))
                continue
            # The Service spreads clients over the ready pods evenly.
            share = offered // len(ready) + (1 if ready.index(i) < offered % len(ready) else 0)
            samples.append(PodSample(f"p{i}", None if self.unreadable(t, i) else share))
        return samples

    def _scale(self, desired: int, t: float) -> None:
        if desired > len(self.pods):
            self.pods += [t + self.ready_delay] * (desired - len(self.pods))
        else:
            del self.pods[desired:]


def changes(ticks: list[Tick]) -> list[tuple[float, int]]:
    """(time, signed change) of every scale action."""
    return [(k.t, k.decision.desired_replicas - k.replicas) for k in ticks if k.decision.changed]


def ramp(points: list[tuple[float, int]]) -> Trace:
    """Piecewise-linear trace through (time, connections) points."""

    def trace(t: float) -> int:
        if t <= points[0][0]:
            return points[0][1]
        for (t0, c0), (t1, c1) in itertools.pairwise(points):
            if t0 <= t <= t1:
                return round(c0 + (c1 - c0) * (t - t0) / (t1 - t0))
        return points[-1][1]

    return trace
