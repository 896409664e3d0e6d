"""kopf wiring: settings, login, one level-based reconcile for create/update/resume, child
watches that re-reconcile the owner (drift repair), and the periodic resync loop."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import logging
import threading
from typing import Any

import kopf

from gpuproxy_operator import engine, kube
from gpuproxy_operator.api.base import GROUP, PLURAL, VERSION
from gpuproxy_operator.naming import CLUSTER_LABEL, PREFIX

log = logging.getLogger("gpuproxy_operator")
AUTOSCALING_HANDLERS = "gpuproxy_operator.autoscaling.handlers"
MAX_BACKOFF = 300.0


def state_of(memo: Any) -> engine.OperatorState:
    if not isinstance(memo, engine.OperatorState):
        raise RuntimeError("the operator must be started with memo=OperatorState(...)")
    return memo


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    state = state_of(memo)
    settings.persistence.finalizer = f"{PREFIX}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration")
    settings.persistence.consistency_timeout = state.consistency_timeout
    settings.watching.inactivity_timeout = state.inactivity_timeout
    # kopf sends this verbatim as the watch's `timeoutSeconds` query parameter, which the API
    # server parses as an integer: "270.0" gets HTTP 400 and kopf gives up on every watch.
    settings.watching.server_timeout = server_timeout_seconds(state.inactivity_timeout)
    # kopf's own Events only for problems; our reconcile posts the meaningful ones.
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = "gpuproxy-operator"
    settings.networking.request_timeout = 60
    settings.networking.connect_timeout = 10
    # Watch only our children server-side (kopf's label filter below re-checks client-side).
    for kind in kube.CHILD_KINDS:
        res = kube.REGISTRY[kind]
        settings.watching.label_selectors[res.api_version, res.plural] = CLUSTER_LABEL


def server_timeout_seconds(inactivity_timeout: float) -> int:
    """The server-side watch timeout: an integer, well inside kopf's inactivity timeout so
    the API server ends a quiet watch before kopf would consider it stuck."""
    return max(1, int(inactivity_timeout) - 30)


@kopf.on.login()
async def login(memo: Any, logger: kopf.Logger, **kwargs: Any) -> kopf.ConnectionInfo | None:
    """kopf's credentials also authenticate our own client (re-run by kopf on a 401)."""
    state = state_of(memo)
    info = state.login(logger=logger, **kwargs)
    if info is not None:
        state.kube.set_credentials(info)
    return info


@kopf.on.probe(id="managedClusters")
def managed_clusters(memo: Any, **_: Any) -> int:
    """Shown by the liveness endpoint."""
    return len(state_of(memo).managed)


def _retry_delay(retry: int) -> float:
    return float(min(MAX_BACKOFF, 2 ** min(retry, 10)))


@kopf.on.resume(GROUP, VERSION, PLURAL, id="reconcile")
@kopf.on.create(GROUP, VERSION, PLURAL, id="reconcile")
@kopf.on.update(GROUP, VERSION, PLURAL, id="reconcile")
async def reconcile_handler(namespace: str | None, name: str, memo: Any, retry: int,
                            logger: kopf.Logger, **_: Any) -> None:
    state = state_of(memo)
    assert namespace is not None  # GpuProxyCluster is namespaced
    try:
        outcome = await engine.request_reconcile(state, (namespace, name), "spec", logger)
    except kube.Transient as exc:
        raise kopf.TemporaryError(str(exc), delay=exc.retry_after or _retry_delay(retry)) from exc
    except kube.Conflict as exc:
        raise kopf.TemporaryError(str(exc), delay=1) from exc
    except kube.KubeError as exc:
        raise kopf.TemporaryError(str(exc), delay=_retry_delay(retry + 4)) from exc
    if outcome is not None and outcome.result == "invalid":
        # Status says Degraded with the fields; retrying an unchanged invalid spec is pointless.
        raise kopf.PermanentError(outcome.message)


@kopf.on.event(GROUP, VERSION, PLURAL, id="forget")
def forget(type: str, namespace: str | None, name: str, uid: str, memo: Any,
           **_: Any) -> None:
    """Drop in-memory state of a deleted cluster. No deletion handler, hence no finalizer:
    the children go by owner-reference garbage collection and deletion never waits for us."""
    if type == "DELETED" and namespace is not None:
        state_of(memo).forget((namespace, name), uid)


async def _on_child_event(body: kopf.Body, memo: Any, logger: kopf.Logger,
                          **_: Any) -> None:
    owner = (body.get("metadata", {}).get("labels") or {}).get(CLUSTER_LABEL)
    namespace = body.get("metadata", {}).get("namespace")
    if not owner or not namespace:
        return
    try:
        await engine.request_reconcile(state_of(memo), (namespace, owner), "child", logger)
    except kube.KubeError as exc:
        # The next child event, the CR's own handler or the resync retries it.
        logger.warning(f"re-reconcile of {namespace}/{owner} after a child change failed: {exc}")


for _kind in kube.CHILD_KINDS:
    _res = kube.REGISTRY[_kind]
    kopf.on.event(_res.api_version, _res.plural, id=f"child-{_res.plural}",
                  labels={CLUSTER_LABEL: kopf.PRESENT})(_on_child_event)


async def resync_loop(state: engine.OperatorState) -> None:
    """Re-reconcile every cluster every `resync_seconds`: an operator-level loop rather than a
    kopf timer, because kopf timers put a finalizer on the object and deletion would then
    wait for a running operator."""
    while True:
        await asyncio.sleep(state.resync_seconds)
        await resync_once(state)


RESYNC_CONCURRENCY = 8


async def resync_once(state: engine.OperatorState) -> None:
    scopes: list[str | None] = list(state.namespaces) or [None]
    keys: list[engine.ClusterKey] = []
    for scope in scopes:
        try:
            items = await state.kube.list(kube.CLUSTER.kind, scope)
        except kube.KubeError as exc:
            log.warning(f"resync: cannot list {PLURAL}: {exc}")
            continue
        keys += [(i["metadata"]["namespace"], i["metadata"]["name"]) for i in items]

    limit = asyncio.Semaphore(RESYNC_CONCURRENCY)

    async def one(key: engine.ClusterKey) -> None:
        async with limit:
            try:
                await engine.request_reconcile(state, key, "resync", log)
            except kube.KubeError as exc:
                log.warning(f"resync of {key[0]}/{key[1]} failed: {exc}")

    await asyncio.gather(*(one(k) for k in keys))


def load_autoscaling() -> bool:
    """Register the autoscaler's kopf handlers when that package provides them."""
    if importlib.util.find_spec(AUTOSCALING_HANDLERS) is None:
        return False
    importlib.import_module(AUTOSCALING_HANDLERS)
    return True


async def run_operator(state: engine.OperatorState, *, clusterwide: bool,
                       liveness_endpoint: str | None = None,
                       stop_flag: asyncio.Event | threading.Event | None = None,
                       ready_flag: asyncio.Event | threading.Event | None = None) -> None:
    """kopf plus the resync loop, until `stop_flag` is set (or the operator exits)."""
    resync = asyncio.create_task(resync_loop(state), name="gpuproxy-resync")
    try:
        await kopf.operator(
            standalone=True,
            clusterwide=clusterwide,
            namespaces=list(state.namespaces),
            liveness_endpoint=liveness_endpoint,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
            memo=state,
        )
    finally:
        resync.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await resync
        await state.kube.close()
