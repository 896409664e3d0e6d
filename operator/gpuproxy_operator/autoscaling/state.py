"""The autoscaler's memory: past recommendations and scale events, small enough to keep in the
cluster's status so an operator restart keeps its stabilization windows and rate limits."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

STATE_VERSION = 1


@dataclass(frozen=True, slots=True)
class Recommendation:
    """What the connection counts asked for at `at` (seconds), before stabilization."""

    at: float
    replicas: int


@dataclass(frozen=True, slots=True)
class ScaleEvent:
    """A change of replicas applied at `at`: positive when scaling up, negative when down."""

    at: float
    change: int


@dataclass(frozen=True, slots=True)
class ScalerState:
    """Recommendations within the longest stabilization window and events within the longest
    policy period; anything older no longer influences a decision and is pruned."""

    recommendations: tuple[Recommendation, ...] = ()
    events: tuple[ScaleEvent, ...] = ()
    last_scale_time: float | None = None

    def pruned(self, now: float, window_seconds: float, period_seconds: float) -> ScalerState:
        """Drop what lies outside the windows that still matter at `now`."""
        return ScalerState(
            recommendations=tuple(r for r in self.recommendations if r.at > now - window_seconds),
            events=tuple(e for e in self.events if e.at > now - period_seconds),
            last_scale_time=self.last_scale_time,
        )

    def compacted(self) -> ScalerState:
        """Without recommendations no decision can see any more: one is dominated when a later
        one is at least as high (the scale-down window's maximum) and a later one at most as
        low (the scale-up window's minimum), since the later ones stay in every window longer.
        A steady load then keeps a single recommendation, so the state only changes when the
        load does."""
        kept: list[Recommendation] = []
        high: int | None = None
        low: int | None = None
        for rec in reversed(self.recommendations):
            if high is None or low is None or rec.replicas > high or rec.replicas < low:
                kept.append(rec)
            high = rec.replicas if high is None else max(high, rec.replicas)
            low = rec.replicas if low is None else min(low, rec.replicas)
        return ScalerState(tuple(reversed(kept)), self.events, self.last_scale_time)

    def with_recommendation(self, at: float, replicas: int) -> ScalerState:
        return ScalerState((*self.recommendations, Recommendation(at, replicas)), self.events,
                           self.last_scale_time)

    def to_json(self) -> str:
        """Compact JSON, for a status field: {"v":1,"r":[[t,n],...],"e":[[t,d],...],"l":t}."""
        body: dict[str, Any] = {
            "v": STATE_VERSION,
            "r": [[round(r.at, 3), r.replicas] for r in self.recommendations],
            "e": [[round(e.at, 3), e.change] for e in self.events],
        }
        if self.last_scale_time is not None:
            body["l"] = round(self.last_scale_time, 3)
        return json.dumps(body, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | None) -> ScalerState:
        """Parse `to_json` output; anything unreadable yields an empty state, which the policy
        seeds with the current replicas, so scale-down still waits a full window."""
        if not text:
            return cls()
        try:
            body = json.loads(text)
            if not isinstance(body, dict) or body.get("v") != STATE_VERSION:
                return cls()
            recs = tuple(Recommendation(float(t), int(n)) for t, n in body.get("r", []))
            events = tuple(ScaleEvent(float(t), int(d)) for t, d in body.get("e", []))
            last = body.get("l")
            return cls(recs, events, float(last) if last is not None else None)
        except (ValueError, TypeError):
            return cls()
