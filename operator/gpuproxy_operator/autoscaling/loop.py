"""One cluster's autoscaling step and loop: read the proxy Deployment and pods, scrape, decide,
write status then replicas, post Events. Kubernetes I/O goes through the ScalingKube protocol."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp

from gpuproxy_operator.api.cluster import InvalidSpecError, parse_cluster
from gpuproxy_operator.autoscaling.policy import Decision, decide
from gpuproxy_operator.autoscaling.report import (
    CONDITION,
    Outcome,
    event_for,
    other_owner,
    outcome_of,
    status_patch,
)
from gpuproxy_operator.autoscaling.scrape import DEFAULT_TIMEOUT, Pod, scrape
from gpuproxy_operator.autoscaling.state import ScalerState
from gpuproxy_operator.kube import Conflict
from gpuproxy_operator.naming import child_name

STATE_FIELD = "autoscalerState"


class ScalingKube(Protocol):
    """The Kubernetes calls the autoscaler makes (see kube_adapter for the real ones)."""

    async def get_deployment(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    async def list_proxy_pods(self, namespace: str, cluster: str) -> Sequence[Pod]: ...
    async def list_autoscalers(self, namespace: str) -> list[dict[str, Any]]: ...
    async def set_replicas(self, namespace: str, deployment: str, replicas: int) -> None: ...
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


def plain(obj: Any) -> Any:
    """kopf hands out Mapping views; pydantic and JSON want dicts and lists."""
    if isinstance(obj, Mapping):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    return obj


@dataclass
class ClusterScaler:
    """The autoscaler of one GpuProxyCluster; keeps its state in memory between steps and
    mirrors it to status so a restarted operator resumes the same windows."""

    kube: ScalingKube
    session: aiohttp.ClientSession
    clock: Callable[[], float] = time.time
    scrape_timeout: float = DEFAULT_TIMEOUT
    state: ScalerState | None = None
    last_reason: str | None = None
    log: logging.Logger = field(default_factory=lambda: logging.getLogger(__name__))

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
            old: dict[str, Any] = next((c for c in status.get("conditions") or []
                        if c.get("type") == CONDITION), {})
            self.last_reason = old.get("reason")
        if self.state is None:
            self.state = ScalerState.from_json(status.get(STATE_FIELD))
        deployment_name = child_name(name, "proxy")
        now = self.clock()

        deployment = await self.kube.get_deployment(ns, deployment_name)
        decision: Decision | None = None
        if deployment is None:
            outcome = Outcome(False, "DeploymentMissing",
                              f"Deployment {ns}/{deployment_name} does not exist yet; the "
                              "operator creates it, scaling starts once it exists")
        else:
            current = int((deployment.get("spec") or {}).get("replicas", 1))
            owner = other_owner(await self.kube.list_autoscalers(ns), deployment_name, name)
            if owner is not None:
                # Report, never fight: keep desiredReplicas at what the other owner chose, so
                # reconcile does not undo it either.
                outcome = Outcome(
                    False, "ReplicasOwnedElsewhere",
                    f"HorizontalPodAutoscaler {owner} also scales Deployment "
                    f"{deployment_name}; delete it or set spec.autoscaling.enabled to false",
                    desired_replicas=current)
            else:
                pods = await self.kube.list_proxy_pods(ns, name)
                result = await scrape(self.session, pods, spec.proxy.admin_port,
                                      self.scrape_timeout)
                decision = decide(spec.autoscaling, spec.proxy.connections_per_replica,
                                  current, result.samples, self.state, now)
                outcome = outcome_of(decision, deployment_name)
                if decision.reason == "MetricsUnavailable" and not any(p.ready for p in pods):
                    outcome = Outcome(False, "NoReadyPods", f"no proxy pod is ready yet; "
                                      f"holding {current} replicas")
                if result.errors:
                    shown = ", ".join(f"{p}: {e}" for p, e in sorted(result.errors.items())[:3])
                    outcome = Outcome(outcome.able, outcome.reason, f"{outcome.message} "
                                      f"({shown})", outcome.current_connections,
                                      outcome.desired_replicas)
        new_state = decision.state if decision is not None else self.state
        # Status first: reconcile sizes the Deployment from status.desiredReplicas, so it must
        # never see the new replicas with the old desiredReplicas (it would undo the scale).
        await write_status(self.kube, body, lambda current: status_patch(
            outcome, current, meta.generation, now, new_state.last_scale_time,
            new_state.to_json()))
        if decision is not None and decision.changed:
            await self.kube.set_replicas(ns, deployment_name, decision.desired_replicas)
        self.state = new_state
        event = event_for(outcome, decision, self.last_reason)
        if event is not None:
            await self.kube.post_event(body, *event)
        self.last_reason = outcome.reason
        return outcome


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

