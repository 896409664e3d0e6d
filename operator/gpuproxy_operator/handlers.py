"""kopf wiring: settings, login, one level-based reconcile for create/update/resume, child
watches that index the children and re-reconcile their owner (drift repair), the periodic
resync loop, and the run under a leader lease."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import logging
import signal
import threading
from typing import Any

import kopf

from gpuproxy_operator import cache, engine, kube, leader
from gpuproxy_operator.api.base import GROUP, PLURAL, VERSION
from gpuproxy_operator.credentials import SecretWatches
from gpuproxy_operator.naming import CLUSTER_LABEL, PREFIX

log = logging.getLogger("gpuproxy_operator")
AUTOSCALING_HANDLERS = "gpuproxy_operator.autoscaling.handlers"
MAX_BACKOFF = 300.0


def state_of(memo: Any) -> engine.OperatorState:
    if not isinstance(memo, engine.OperatorState):
        raise RuntimeError("the operator must be started with memo=OperatorState(...)")
    return memo


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: Any, **kwargs: Any) -> None:
    """kopf's settings, and the children indices (kopf passes every index to startup handlers
    by its id) for reconcile's reads."""
    state = state_of(memo)
    if state.children_cache is not None:
        state.children_cache.attach(kwargs)
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
        for client in (state.kube, state.lease_kube):
            if client is not None:
                client.set_credentials(info)
    return info


@kopf.on.probe(id="managedClusters")
def managed_clusters(memo: Any, **_: Any) -> int:
    """Shown by the liveness endpoint."""
    return len(state_of(memo).managed)


@kopf.on.cleanup()
async def stop_watches(memo: Any, **_: Any) -> None:
    """Operator shutdown: end the Secret watches and background reconciles now, rather than
    kopf waiting for them as hung tasks (which delays the lease's release by seconds)."""
    state = state_of(memo)
    if state.secrets is not None:
        await state.secrets.close()
    tasks = list(state.background)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _retry_delay(retry: int) -> float:
    return float(min(MAX_BACKOFF, 2 ** min(retry, 10)))


@kopf.on.resume(GROUP, VERSION, PLURAL, id="reconcile")
@kopf.on.create(GROUP, VERSION, PLURAL, id="reconcile")
@kopf.on.update(GROUP, VERSION, PLURAL, id="reconcile")
async def reconcile_handler(namespace: str | None, name: str, memo: Any, retry: int,
                            logger: kopf.Logger, body: kopf.Body | None = None,
                            **_: Any) -> None:
    state = state_of(memo)
    assert namespace is not None  # GpuProxyCluster is namespaced
    _mark_indexed(state)
    hint = kube.plain(body) if body is not None else None  # fresh: this event's body
    try:
        outcome = await engine.request_reconcile(state, (namespace, name), "spec", logger, hint)
    except kube.Transient as exc:
        raise kopf.TemporaryError(str(exc), delay=exc.retry_after or _retry_delay(retry)) from exc
    except kube.Conflict as exc:
        raise kopf.TemporaryError(str(exc), delay=1) from exc
    except kube.KubeError as exc:
        raise kopf.TemporaryError(str(exc), delay=_retry_delay(retry + 4)) from exc
    if outcome is not None and outcome.result == "invalid":
        # Status says Degraded with the fields; retrying an unchanged invalid spec is pointless.
        raise kopf.PermanentError(outcome.message)


def _mark_indexed(state: engine.OperatorState) -> None:
    """kopf runs resource handlers only once the initial listings are indexed: from now on the
    caches are complete."""
    if state.children_cache is not None:
        state.children_cache.ready = True


@kopf.on.event(GROUP, VERSION, PLURAL, id="clusters")
def track_cluster(type: str, body: kopf.Body, namespace: str | None, name: str, uid: str,
                  memo: Any, **_: Any) -> None:
    """Keep the latest body of every cluster (what child-triggered reconciles start from), and
    drop the in-memory state of a deleted one. No deletion handler, hence no finalizer: the
    children go by owner-reference garbage collection and deletion never waits for us."""
    state = state_of(memo)
    _mark_indexed(state)
    if namespace is None:
        return
    if type == "DELETED":
        state.forget((namespace, name), uid)
    else:
        state.clusters[(namespace, name)] = kube.plain(body)


def _index_child(body: kopf.Body, namespace: str | None, labels: kopf.Labels,
                 **_: Any) -> dict[tuple[str | None, str], str]:
    """(namespace, owning cluster) -> the child; kopf drops it when it is deleted or loses the
    label, and fills the index before any handler runs."""
    return {(namespace, str(labels.get(CLUSTER_LABEL))): cache.compact(body)}


async def _on_child_event(body: kopf.Body, memo: Any, logger: kopf.Logger,
                          **_: Any) -> None:
    owner = (body.get("metadata", {}).get("labels") or {}).get(CLUSTER_LABEL)
    namespace = body.get("metadata", {}).get("namespace")
    state = state_of(memo)
    _mark_indexed(state)
    if not owner or not namespace:
        return
    try:
        await engine.request_reconcile(state, (namespace, owner), "child", logger)
    except kube.KubeError as exc:
        # The next child event, the CR's own handler or the resync retries it.
        logger.warning(f"re-reconcile of {namespace}/{owner} after a child change failed: {exc}")


for _kind in kube.CHILD_KINDS:
    _res = kube.REGISTRY[_kind]
    kopf.index(_res.api_version, _res.plural, id=cache.index_id(_kind),
               labels={CLUSTER_LABEL: kopf.PRESENT})(_index_child)
    kopf.on.event(_res.api_version, _res.plural, id=f"child-{_res.plural}",
                  labels={CLUSTER_LABEL: kopf.PRESENT})(_on_child_event)


async def resync_loop(state: engine.OperatorState) -> None:
    """Re-reconcile every cluster every `resync_seconds`: an operator-level loop rather than a
    kopf timer, because kopf timers put a finalizer on the object and deletion would then
    wait for a running operator. One list of the clusters per watched scope; the children
    come from the watch caches, so a converged cluster costs no request."""
    while True:
        await asyncio.sleep(state.resync_seconds)
        await resync_once(state)


RESYNC_CONCURRENCY = 8


async def resync_once(state: engine.OperatorState) -> None:
    scopes: list[str | None] = list(state.namespaces) or [None]
    listed: list[dict[str, Any]] = []
    for scope in scopes:
        try:
            listed += await state.kube.list(kube.CLUSTER.kind, scope)
        except kube.KubeError as exc:
            log.warning(f"resync: cannot list {PLURAL}: {exc}")

    limit = asyncio.Semaphore(RESYNC_CONCURRENCY)

    async def one(item: dict[str, Any]) -> None:
        key = (item["metadata"]["namespace"], item["metadata"]["name"])
        async with limit:
            try:
                # The listed body is fresh: a converged cluster is reconciled without a read.
                await engine.request_reconcile(state, key, "resync", log, item)
            except kube.KubeError as exc:
                log.warning(f"resync of {key[0]}/{key[1]} failed: {exc}")

    await asyncio.gather(*(one(i) for i in listed))


def load_autoscaling() -> bool:
    """Register the autoscaler's kopf handlers when that package provides them."""
    if importlib.util.find_spec(AUTOSCALING_HANDLERS) is None:
        return False
    importlib.import_module(AUTOSCALING_HANDLERS)
    return True


async def _relay(flag: asyncio.Event | threading.Event | None, stop: asyncio.Event) -> None:
    """Set `stop` when the caller's flag is set. A thread's flag is waited for a second at a
    time: an executor thread blocked for good would keep the event loop from closing when
    we stop for another reason (a lost lease)."""
    if isinstance(flag, asyncio.Event):
        await flag.wait()
    elif flag is not None:
        loop = asyncio.get_running_loop()
        while not await loop.run_in_executor(None, flag.wait, 1.0):
            pass
    else:
        return
    stop.set()


def _catch_signals(stop: asyncio.Event) -> None:
    """SIGTERM/SIGINT stop a waiting follower too (kopf installs its own once it runs)."""
    if threading.current_thread() is threading.main_thread():
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)


async def run_operator(state: engine.OperatorState, *, clusterwide: bool,
                       liveness_endpoint: str | None = None,
                       stop_flag: asyncio.Event | threading.Event | None = None,
                       ready_flag: asyncio.Event | threading.Event | None = None,
                       election: leader.LeaseConfig | None = None) -> str | None:
    """kopf plus the resync loop, until `stop_flag` is set (or the operator exits); with
    `election`, only once this process holds the Lease, and only as long as it does. Returns
    why leadership was lost (the caller exits non-zero), None on a normal stop."""
    stop = asyncio.Event()
    relay = asyncio.create_task(_relay(stop_flag, stop), name="gpuproxy-stop-relay")
    _catch_signals(stop)
    if state.children_cache is None:
        state.children_cache = cache.ChildCache()
    if state.secrets is None:
        state.secrets = SecretWatches(state.kube, lambda key: state.schedule(key, "secret", log))
    elector, holding, resync = None, None, None
    try:
        if election is not None:
            elector = await _elect(state, election, liveness_endpoint, stop)
            if elector is None:
                return None
            # Created before kopf starts, so kopf's shutdown does not cancel it: the lease
            # is renewed until kopf has stopped writing.
            holding = asyncio.create_task(leader.keep(elector, state.kube.fence, stop),
                                          name="gpuproxy-lease")
        resync = asyncio.create_task(resync_loop(state), name="gpuproxy-resync")
        await kopf.operator(
            standalone=True,
            clusterwide=clusterwide,
            namespaces=list(state.namespaces),
            liveness_endpoint=liveness_endpoint,
            stop_flag=stop,
            ready_flag=ready_flag,
            memo=state,
        )
    finally:
        stop.set()
        for task in (resync, relay, *state.background):
            if task is not None:
                task.cancel()
        await state.secrets.close()
        lost = await holding if holding is not None else None
        if elector is not None and lost is None:
            await elector.release()  # a rolling update hands over at once
        await state.kube.close()
        if state.lease_kube is not None:
            await state.lease_kube.close()
    return lost


async def _elect(state: engine.OperatorState, election: leader.LeaseConfig,
                 liveness_endpoint: str | None, stop: asyncio.Event
                 ) -> leader.LeaderElector | None:
    """Log in (kopf is not running yet), then wait for the lease, answering liveness probes
    meanwhile; None when stopped first."""
    info = state.login(logger=log, settings=kopf.OperatorSettings())
    if info is None:
        raise RuntimeError("no Kubernetes credentials: neither a service account nor a "
                           "kubeconfig was found")
    if state.lease_kube is None:
        # Its own client: lease renewals never wait behind reconciles in the rate limiter.
        state.lease_kube = kube.KubeClient(on_call=state.kube.on_call,
                                           user_agent=state.kube.user_agent)
    for client in (state.kube, state.lease_kube):
        client.set_credentials(info)
    elector = leader.LeaderElector(state.lease_kube, election)
    runner = (await leader.serve_follower_liveness(liveness_endpoint, elector)
              if liveness_endpoint else None)
    try:
        acquired = await elector.acquire(stop)
    finally:
        if runner is not None:
            await runner.cleanup()
    return elector if acquired else None
