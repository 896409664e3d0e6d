"""One cluster's scaling step and loop: read the proxy Deployment and pods, scrape, decide, mark
the least loaded pods, write status (only on change) then replicas, post Events. Kubernetes
I/O goes through the ScalingKube protocol."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp

from gpuproxy_operator.api.base import KIND
from gpuproxy_operator.api.cluster import GpuProxyCluster, InvalidSpecError, parse_cluster
from gpuproxy_operator.autoscaling.deletion import changed_costs, deletion_costs
from gpuproxy_operator.autoscaling.ownership import HANDOVER_FIELD, OWNER_FIELD, find_autoscalers
from gpuproxy_operator.autoscaling.policy import Decision, PodSample, decide, descend
from gpuproxy_operator.autoscaling.report import (
    CONDITION,
    DISABLED_MESSAGE,
    Outcome,
    event_for,
    outcome_of,
    owned_view,
    status_changes,
    status_patch,
    wanted_view,
)
from gpuproxy_operator.autoscaling.scrape import DEFAULT_TIMEOUT, Pod, scrape
from gpuproxy_operator.autoscaling.state import ScalerState
from gpuproxy_operator.kube import POD_DELETION_COST, Conflict, KubeError, NotFound, plain
from gpuproxy_operator.naming import child_name
from gpuproxy_operator.operator_metrics import OperatorMetrics

STATE_FIELD = "autoscalerState"
# The longest a changed connection count, message or recommendation history waits for a status
# write when nothing significant changed (and the shortest gap between such writes).
REFRESH_SECONDS = 180.0
COST_CONCURRENCY = 16  # concurrent pod-deletion-cost patches before a scale-down


class ScalingKube(Protocol):
    """The Kubernetes calls the autoscaler makes (see kube_adapter for the real ones)."""

    async def get_deployment(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    async def list_proxy_pods(self, namespace: str, cluster: str) -> Sequence[Pod]: ...
    async def list_autoscalers(self, namespace: str) -> list[dict[str, Any]]: ...
    async def set_replicas(self, namespace: str, deployment: str, replicas: int) -> None: ...
    async def set_deletion_cost(self, namespace: str, pod: str, cost: int) -> None: ...
    async def get_cluster(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    async def patch_status(self, namespace: str, name: str, status: dict[str, Any],
                           resource_version: str | None) -> None:
        """Raises kube.Conflict when `resource_version` is no longer the object's."""
    async def post_event(self, body: dict[str, Any], type_: str, reason: str,
                         message: str) -> None: ...


STATUS_ATTEMPTS = 3


async def write_status(kube: ScalingKube, body: dict[str, Any],
                       build: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Patch the cluster's status with `build(current status)`, guarded by the body's
    resourceVersion: the patch replaces `conditions` as a whole, so a stale body must never
    overwrite a newer Ready/Degraded from reconcile. On a conflict, re-read and rebuild."""
    for attempt in range(STATUS_ATTEMPTS):
        meta = body.get("metadata") or {}
        ns, name = meta["namespace"], meta["name"]
        try:
            await kube.patch_status(ns, name, build(body.get("status") or {}),
                                    meta.get("resourceVersion"))
            return
        except Conflict:
            if attempt == STATUS_ATTEMPTS - 1:
                raise
        fresh = await kube.get_cluster(ns, name)
        if fresh is None:
            return  # deleted meanwhile: nothing to report on
        body = plain(fresh)


def _normalized(state: ScalerState) -> ScalerState:
    """As it reads back from status (timestamps rounded), to compare with a checkpoint."""
    return ScalerState.from_json(state.to_json())


@dataclass
class ClusterScaler:
    """The replica scaler of one GpuProxyCluster: the autoscaler while spec.autoscaling is on,
    else the paced descent to a lower spec.proxy.replicas. Keeps its state in memory between
    steps and checkpoints it to status, so a restarted operator resumes the same windows."""

    kube: ScalingKube
    session: aiohttp.ClientSession
    clock: Callable[[], float] = time.time
    scrape_timeout: float = DEFAULT_TIMEOUT
    state: ScalerState | None = None
    last_reason: str | None = None
    log: logging.Logger = field(default_factory=lambda: logging.getLogger(__name__))
    saved: ScalerState | None = None  # as last checkpointed
    saved_at: float | None = None
    written_at: float | None = None  # of our last status write
    resumed: bool = False
    metrics: OperatorMetrics | None = None  # the gauges the operator's alerts read

    async def step(self, raw_body: Mapping[str, Any]) -> Outcome | None:
        """One scrape-decide-apply round; None when the spec is invalid (reconcile reports it)."""
        body: dict[str, Any] = plain(raw_body)
        try:
            cluster = parse_cluster(body)
        except InvalidSpecError:
            return None
        meta, spec = cluster.metadata, cluster.spec
        ns, name = meta.namespace, meta.name
        status: dict[str, Any] = body.get("status") or {}
        if self.last_reason is None:
            old: dict[str, Any] = owned_view(status)[CONDITION] or {}
            self.last_reason = old.get("reason")
        if self.state is None:
            self.state = self.saved = ScalerState.from_json(status.get(STATE_FIELD))
        deployment_name = child_name(name, "proxy")
        now = self.clock()

        deployment = await self.kube.get_deployment(ns, deployment_name)
        decision: Decision | None = None
        pods: Sequence[Pod] = ()
        samples: tuple[PodSample, ...] = ()
        if deployment is None:
            outcome = Outcome(False, "DeploymentMissing",
                              f"Deployment {ns}/{deployment_name} does not exist yet; the "
                              "operator creates it, scaling starts once it exists")
        else:
            current = int((deployment.get("spec") or {}).get("replicas", 1))
            if not self.resumed and spec.autoscaling.behavior.scale_down.\
                    stabilization_window_seconds > 0:
                # Whatever the checkpoint missed, a restart never shortens the scale-down
                # window: it starts again at the current count (as a restarted HPA does).
                self.state = self.state.with_recommendation(now, current)
            self.resumed = True
            holding = await self._holding(cluster, status, current)
            if holding is not None:
                outcome = holding
            else:
                pods = await self.kube.list_proxy_pods(ns, name)
                outcome, decision, samples = await self._decide(cluster, pods, current, now)
        state = decision.state if decision is not None else self.state
        if decision is not None and decision.changed and (
                decision.desired_replicas < decision.current_replicas):
            await self._mark_least_loaded(ns, pods, samples)
        # Status and Event first: the scale event is in status.autoscalerState before the
        # replicas change, so an operator dying in between never lets its successor repeat the
        # step (a replica write that then fails only makes the rate limit stricter once).
        await self._report(body, outcome, meta.generation, now, state)
        event = event_for(outcome, decision, self.last_reason)
        if event is not None:
            await self.kube.post_event(body, *event)
        if decision is not None and decision.changed:
            await self.kube.set_replicas(ns, deployment_name, decision.desired_replicas)
        self.state = state
        self.last_reason = outcome.reason
        self._record(ns, name, spec.autoscaling.enabled, outcome, decision)
        return outcome

    def _record(self, ns: str, name: str, enabled: bool, outcome: Outcome,
                decision: Decision | None) -> None:
        if self.metrics is None:
            return
        if not enabled:
            # The paced descent of a lower spec.proxy.replicas reports "not able" by design;
            # it must not look like an autoscaler that cannot scale.
            self.metrics.autoscaler_stopped(ns, name)
            return
        scaled_by = (decision.desired_replicas - decision.current_replicas
                     if decision is not None and decision.changed else 0)
        self.metrics.autoscaler_step(ns, name, outcome.able, outcome.reason,
                                     outcome.desired_replicas, scaled_by)

    async def _holding(self, cluster: GpuProxyCluster, status: Mapping[str, Any],
                       current: int) -> Outcome | None:
        """Why this step changes nothing without reading the pods, or None: another owner, or
        (autoscaling off) no spec.proxy.replicas scale-down left to this loop."""
        spec, name = cluster.spec, cluster.metadata.name
        deployment = child_name(name, "proxy")
        found = find_autoscalers(await self.kube.list_autoscalers(cluster.metadata.namespace),
                                 deployment, name)
        other = found.on_deployment or (found.on_cluster if spec.autoscaling.enabled else None)
        if other is not None:
            # Report, never fight (reconcile states the owner in status.replicasOwner).
            target = f"Deployment {deployment}" if found.on_deployment else f"this {KIND}"
            return Outcome(False, "ReplicasOwnedElsewhere",
                           f"HorizontalPodAutoscaler {other} also scales {target}; the operator "
                           "leaves the replicas alone: delete it or set spec.autoscaling.enabled "
                           "to false")
        if not spec.autoscaling.enabled and (
                status.get(OWNER_FIELD) != "Spec" or status.get(HANDOVER_FIELD) is not None
                or current <= spec.proxy.replicas):
            return Outcome(False, "Disabled", DISABLED_MESSAGE)
        return None

    async def _decide(self, cluster: GpuProxyCluster, pods: Sequence[Pod], current: int,
                      now: float) -> tuple[Outcome, Decision, tuple[PodSample, ...]]:
        """Scrape the pods and decide: the autoscaler's policy, or the paced descent."""
        assert self.state is not None
        spec, deployment = cluster.spec, child_name(cluster.metadata.name, "proxy")
        result = await scrape(self.session, pods, spec.proxy.admin_port, self.scrape_timeout)
        if spec.autoscaling.enabled:
            decision = decide(spec.autoscaling, spec.proxy.connections_per_replica, current,
                              result.samples, self.state, now)
        else:
            decision = descend(spec.autoscaling.behavior, spec.proxy.replicas, current,
                               result.samples, self.state, now)
        outcome = outcome_of(decision, deployment)
        if decision.reason == "MetricsUnavailable" and not any(p.ready for p in pods):
            outcome = Outcome(False, "NoReadyPods", f"no proxy pod is ready yet; holding "
                              f"{current} replicas")
        if result.errors:
            shown = ", ".join(f"{p}: {e}" for p, e in sorted(result.errors.items())[:3])
            outcome = Outcome(outcome.able, outcome.reason, f"{outcome.message} ({shown})",
                              outcome.current_connections, outcome.desired_replicas)
        return outcome, decision, result.samples

    async def _mark_least_loaded(self, ns: str, pods: Sequence[Pod],
                                 samples: Sequence[PodSample]) -> None:
        """Right before a scale-down: pod-deletion-cost = connections, so the ReplicaSet
        removes the least loaded pods. A failure only loses that preference."""
        todo = changed_costs(deletion_costs(samples), {p.name: p.deletion_cost for p in pods})
        limit = asyncio.Semaphore(COST_CONCURRENCY)

        async def one(pod: str, cost: int) -> KubeError | None:
            async with limit:
                try:
                    await self.kube.set_deletion_cost(ns, pod, cost)
                except NotFound:
                    return None  # gone meanwhile
                except KubeError as exc:
                    return exc
            return None

        failed = [e for e in await asyncio.gather(*(one(p, c) for p, c in todo.items())) if e]
        if failed:
            self.log.warning(f"could not set {POD_DELETION_COST} on {len(failed)} pods "
                             f"({failed[0]}); the ReplicaSet picks the pods to remove")

    def _checkpoint_due(self, state: ScalerState, now: float) -> bool:
        """Write autoscalerState after a scale (rate limits), or when the recommendations a
        window can see changed and the last checkpoint is REFRESH_SECONDS old; timestamps of an
        unchanged state are never worth a write (a restart re-seeds the window)."""
        state, saved = _normalized(state), self.saved or ScalerState()
        if (state.events, state.last_scale_time) != (saved.events, saved.last_scale_time):
            return True
        values = [r.replicas for r in state.recommendations]
        old_values = [r.replicas for r in saved.recommendations]
        return values != old_values and (self.saved_at is None
                                         or now - self.saved_at >= REFRESH_SECONDS)

    async def _report(self, body: dict[str, Any], outcome: Outcome, generation: int | None,
                      now: float, state: ScalerState) -> None:
        """Write the autoscaler's status fields, only those that changed and only when the
        change is significant or the refresh is due."""
        # Against the live body (level-based: a field lost or changed elsewhere is rewritten),
        # which the watch has updated with our last write long before the next step.
        old = owned_view(body.get("status") or {})
        if outcome.reason == "Disabled" and old[CONDITION] is None:
            return  # never autoscaled: nothing to correct, keep quiet
        due = self._checkpoint_due(state, now)
        new = wanted_view(outcome, old, generation, now, state.last_scale_time,
                          state.to_json() if due else None)
        refresh = self.written_at is None or now - self.written_at >= REFRESH_SECONDS
        changes = status_changes(new, old, refresh)
        if changes is None:
            return
        await write_status(self.kube, body, lambda current: status_patch(changes, current))
        self.written_at = now
        if "autoscalerState" in changes:
            self.saved, self.saved_at = _normalized(state), now


class ScalerRunner(Protocol):
    """What run_loop drives (ClusterScaler)."""

    async def step(self, raw_body: Mapping[str, Any]) -> Outcome | None: ...


async def run_loop(
    scaler: ScalerRunner,
    body: Mapping[str, Any],
    wait: Callable[[float], Awaitable[bool]],
    log: logging.Logger,
) -> None:
    """Step every spec.autoscaling.intervalSeconds (read from the live body each time) until
    `wait` returns True (stopped). Errors are logged and retried at the next interval."""
    while True:
        try:
            await scaler.step(body)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A long-lived loop: an API hiccup must not end autoscaling for this cluster.
            log.exception("autoscaling step failed; retrying in one interval")
        spec = (body.get("spec") or {}).get("autoscaling") or {}
        if await wait(float(spec.get("intervalSeconds", 15))):
            return

