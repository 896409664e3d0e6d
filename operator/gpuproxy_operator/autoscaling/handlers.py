"""kopf wiring of the autoscaler: one asyncio task per GpuProxyCluster with autoscaling enabled
(or a paced spec.proxy.replicas scale-down pending) and not paused, started and stopped from
the cluster's watch events. Not a kopf daemon: daemons put a finalizer on the object, and
deleting a cluster must not wait for a running operator."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import kopf

from gpuproxy_operator.api.base import GROUP, PLURAL, VERSION
from gpuproxy_operator.autoscaling.kube_adapter import KubeScaling
from gpuproxy_operator.autoscaling.loop import (
    ClusterScaler,
    ScalingKube,
    run_loop,
    write_status,
)
from gpuproxy_operator.autoscaling.ownership import descent_pending
from gpuproxy_operator.autoscaling.report import (
    CONDITION,
    DISABLED_MESSAGE,
    Outcome,
    scaling_condition,
)
from gpuproxy_operator.kube import plain
from gpuproxy_operator.operator_metrics import OperatorMetrics

TASK_PREFIX = "gpuproxy-autoscaler:"
MEMO_ATTR = "autoscaler"  # on kopf's per-object memo copy


# How long a stopping loop may take to finish its step (a scale-down is marked, applied, then
# reported and announced as one) before it is cancelled.
STOP_GRACE_SECONDS = 30.0


@dataclass
class Tracker:
    """Per-cluster: the live body the loop reads, the loop's task and its stop request."""

    body: dict[str, Any] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)


def inactive_reason(body: Mapping[str, Any]) -> str | None:
    """Why this cluster's scaling loop must not run now, or None when it must: autoscaling
    is on, or reconcile left a spec.proxy.replicas scale-down to its paced steps."""
    spec = body.get("spec") or {}
    if (body.get("metadata") or {}).get("deletionTimestamp"):
        return "Deleting"
    if spec.get("paused", False):
        return "Paused"
    if not (spec.get("autoscaling") or {}).get("enabled", False) and not descent_pending(body):
        return "Disabled"
    return None


INACTIVE_MESSAGES = {
    "Disabled": DISABLED_MESSAGE,
    "Paused": "spec.paused is true: the autoscaler leaves the replicas as they are",
}


async def _loop(tracker: Tracker, kube: ScalingKube, log: logging.Logger,
                metrics: OperatorMetrics | None) -> None:
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector) as session:
        scaler = ClusterScaler(kube, session, clock=time.time, metrics=metrics)

        async def wait(seconds: float) -> bool:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(tracker.stop.wait(), seconds)
            return tracker.stop.is_set()

        await run_loop(scaler, tracker.body, wait, log)


async def _report_inactive(kube: ScalingKube, body: dict[str, Any], reason: str,
                           stopped: bool) -> None:
    """Say once that autoscaling stopped, if a Scaling condition says otherwise (after a loop
    just stopped, from a fresh read: its last step wrote after this event's body)."""
    if stopped:
        meta = body.get("metadata") or {}
        fresh = await kube.get_cluster(meta.get("namespace", ""), meta.get("name", ""))
        body = plain(fresh) if fresh is not None else body
    status = body.get("status") or {}
    conditions = list(status.get("conditions") or [])
    old = next((c for c in conditions if c.get("type") == CONDITION), None)
    if old is None or old.get("reason") == reason:
        return  # never autoscaled (keep quiet: no writes), or already reported
    outcome = Outcome(False, reason, INACTIVE_MESSAGES[reason])
    generation = (body.get("metadata") or {}).get("generation")
    now = time.time()
    await write_status(kube, body, lambda current: {"conditions": scaling_condition(
        outcome, list(current.get("conditions") or []), generation, now)})


def _metrics(memo: Any) -> OperatorMetrics | None:
    """The operator's metrics (kopf's memo is the OperatorState); tests may pass a bare memo."""
    metrics = getattr(memo, "metrics", None)
    return metrics if isinstance(metrics, OperatorMetrics) else None


async def track(event: Mapping[str, Any], body: Mapping[str, Any], memo: Any, kube: ScalingKube,
                logger: logging.Logger | logging.LoggerAdapter[Any]) -> None:
    """Start, feed or stop the cluster's loop according to the latest watch event."""
    tracker: Tracker | None = getattr(memo, MEMO_ATTR, None)
    if tracker is None:
        tracker = Tracker()
        setattr(memo, MEMO_ATTR, tracker)
    raw = plain(body)
    # The loop reads this dict every interval: update it in place.
    tracker.body.clear()
    tracker.body.update(raw)
    reason = "Deleting" if event.get("type") == "DELETED" else inactive_reason(raw)
    running = tracker.task is not None and not tracker.task.done()
    if reason is None and not running:
        meta = raw["metadata"]
        log = logging.getLogger(f"gpuproxy_operator.autoscaling.{meta['namespace']}.{meta['name']}")
        tracker.task = asyncio.get_running_loop().create_task(
            _loop(tracker, kube, log, _metrics(memo)),
            name=f"{TASK_PREFIX}{meta['namespace']}/{meta['name']}")
        logger.info("autoscaling started")
    elif reason is not None and running:
        assert tracker.task is not None
        # Let the current step finish (never cut between a scale and its report); the loop
        # ends at its next wait.
        tracker.stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(tracker.task), STOP_GRACE_SECONDS)
        except TimeoutError:
            tracker.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await tracker.task
        tracker.task, tracker.stop = None, asyncio.Event()
        metrics = _metrics(memo)
        if metrics is not None:
            metrics.autoscaler_stopped(raw["metadata"]["namespace"], raw["metadata"]["name"])
        logger.info(f"autoscaling stopped: {reason}")
    if reason in INACTIVE_MESSAGES:
        await _report_inactive(kube, raw, reason, stopped=running)


@kopf.on.event(GROUP, VERSION, PLURAL, id="autoscaler")
async def autoscaler_event(event: kopf.RawEvent, body: kopf.Body, memo: Any,
                           logger: kopf.Logger, **_: Any) -> None:
    await track(event, body, memo, KubeScaling(memo.kube), logger)


@kopf.on.cleanup()
async def stop_autoscalers(logger: kopf.Logger, **_: Any) -> None:
    """Operator shutdown: end every cluster's loop (their tasks are named, so no registry)."""
    tasks = [t for t in asyncio.all_tasks() if t.get_name().startswith(TASK_PREFIX)]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if tasks:
        logger.info(f"stopped {len(tasks)} autoscaler loops")
