"""One reconcile of one GpuProxyCluster: observe -> build -> apply -> status, plus the operator's
shared state (client, metrics, per-cluster locks). kopf-free, so handlers stay thin."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import datetime
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import kopf

from gpuproxy_operator import apply, credentials, kube, reconcile, status
from gpuproxy_operator.api.base import KIND
from gpuproxy_operator.api.cluster import GpuProxyCluster, InvalidSpecError, parse_cluster
from gpuproxy_operator.autoscaling import ownership
from gpuproxy_operator.autoscaling.kube_adapter import list_autoscalers
from gpuproxy_operator.builders import BuildInputs, DatabaseCredentials, build_all
from gpuproxy_operator.builders.images import OperandImages, with_images
from gpuproxy_operator.builders.redis_auth import (
    build_generated_redis_secret,
    generated_secret_name,
    needs_generated_secret,
)
from gpuproxy_operator.cache import ChildCache
from gpuproxy_operator.kube import KubeClient
from gpuproxy_operator.naming import CLUSTER_LABEL, PREFIX, child_name
from gpuproxy_operator.node_tuning import TTL_SECONDS as NODE_TUNING_TTL
from gpuproxy_operator.node_tuning import NodeTuningProbe, TuningSeen
from gpuproxy_operator.operator_metrics import OperatorMetrics
from gpuproxy_operator.platform import Platform

ClusterKey = tuple[str, str]  # (namespace, name)
LoginFn = Callable[..., kopf.ConnectionInfo | None]
Result = Literal["converged", "changed", "paused", "invalid", "degraded", "gone"]
# Set to the cluster's metadata.generation, it lets reconcile replace the proxy Deployment
# (delete + create, dropping every connection) for that generation of the spec only.
ALLOW_REPLACE_ANNOTATION = f"{PREFIX}/allow-proxy-replacement"
_PLACEHOLDER = DatabaseCredentials("placeholder", "placeholder")


def default_login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In-cluster service account first, then the local kubeconfig."""
    info: kopf.ConnectionInfo | None = kopf.login_with_service_account(**kwargs)
    return info or kopf.login_with_kubeconfig(**kwargs)


@dataclass
class OperatorState:
    """Shared by every handler (kopf passes it as `memo`; its per-object shallow copies share
    these containers)."""

    kube: kube.KubeClient
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    login: LoginFn = default_login
    namespaces: tuple[str, ...] = ()  # empty: every namespace
    resync_seconds: float = 600.0
    inactivity_timeout: float = 300.0
    consistency_timeout: float = 5.0
    locks: dict[ClusterKey, asyncio.Lock] = field(default_factory=dict)
    pending: set[ClusterKey] = field(default_factory=set)
    # (cluster uid, kind, name) -> spec hash the API server rejected with 422: not retried
    # until the desired body changes, so an invalid child never loops.
    rejected: dict[tuple[str, str, str], str] = field(default_factory=dict)
    managed: set[str] = field(default_factory=set)
    # (cluster uid, kind, name) -> (spec hash, fingerprint of the server's answer) when the
    # server did not keep all of our write (a dropped or webhook-mutated field): not re-sent
    # while the child stays exactly as answered, so converged still means zero writes.
    settled: dict[tuple[str, str, str], tuple[str, str]] = field(default_factory=dict)
    # Watch caches, set up by handlers.run_operator (configure attaches kopf's indices);
    # without them every reconcile reads the API.
    children_cache: ChildCache | None = None
    secrets: credentials.SecretWatches | None = None
    lease_kube: KubeClient | None = None  # the leader election's own client
    clusters: dict[ClusterKey, dict[str, Any]] = field(default_factory=dict)  # latest CR bodies
    concurrency: int = 4  # reconciles at once, all clusters together (a restart, a resync)
    # The admin's choices from the chart: default images, the operator's pods, node tuning.
    platform: Platform = field(default_factory=Platform)
    background: set[asyncio.Task[Any]] = field(default_factory=set)
    node_tuning_probe: NodeTuningProbe | None = None  # made on first use, from `platform`
    node_tuning_ttl: float = NODE_TUNING_TTL  # how long one read of its DaemonSet is reused
    # Made here, not on first use: kopf's per-object copies of the memo must share it.
    _slots: asyncio.Semaphore = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._slots = asyncio.Semaphore(max(1, self.concurrency))

    def lock(self, key: ClusterKey) -> asyncio.Lock:
        return self.locks.setdefault(key, asyncio.Lock())

    def slots(self) -> asyncio.Semaphore:
        return self._slots

    def schedule(self, key: ClusterKey, trigger: str,
                 logger: logging.Logger | logging.LoggerAdapter[Any]) -> None:
        """Reconcile in the background (a watched Secret changed); failures are logged, and the
        next event or resync retries."""
        async def one() -> None:
            try:
                await request_reconcile(self, key, trigger, logger)
            except kube.KubeError as exc:
                logger.warning(f"{trigger} reconcile of {key[0]}/{key[1]} failed: {exc}")

        task = asyncio.get_running_loop().create_task(one(), name=f"gpuproxy-{trigger}")
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def forget(self, key: ClusterKey, uid: str) -> None:
        self.locks.pop(key, None)
        self.clusters.pop(key, None)
        if self.children_cache is not None:
            self.children_cache.forget(key)
        if self.secrets is not None:
            self.secrets.forget(key)
        self.managed.discard(uid)
        self.metrics.managed_clusters.set(len(self.managed))
        for rkey in [k for k in self.rejected if k[0] == uid]:
            del self.rejected[rkey]
        for skey in [k for k in self.settled if k[0] == uid]:
            del self.settled[skey]


@dataclass
class Outcome:
    result: Result
    message: str = ""


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def request_reconcile(state: OperatorState, key: ClusterKey, trigger: str,
                            logger: logging.Logger | logging.LoggerAdapter[Any],
                            hint: dict[str, Any] | None = None) -> Outcome | None:
    """Reconcile unless one is already queued behind the running one (bursts of child events
    collapse into one extra pass, which sees their latest state)."""
    if key in state.pending:
        return None
    state.pending.add(key)
    async with state.lock(key):
        state.pending.discard(key)
        return await run(state, key, trigger, logger, hint)


async def run(state: OperatorState, key: ClusterKey, trigger: str,
              logger: logging.Logger | logging.LoggerAdapter[Any],
              hint: dict[str, Any] | None = None) -> Outcome:
    """Reconcile under the cluster's lock (callers hold it), with metrics, in one of the
    operator's few reconcile slots."""
    async with state.slots():
        return await _run(state, key, trigger, logger, hint)


async def _run(state: OperatorState, key: ClusterKey, trigger: str,
               logger: logging.Logger | logging.LoggerAdapter[Any],
               hint: dict[str, Any] | None) -> Outcome:
    started = time.monotonic()
    try:
        outcome = await reconcile_cluster(state, key, logger, hint)
    except kube.KubeError as exc:
        state.metrics.reconciles.labels(trigger, "error").inc()
        state.metrics.errors.labels(type(exc).__name__).inc()
        raise
    finally:
        state.metrics.duration.observe(time.monotonic() - started)
    state.metrics.reconciles.labels(trigger, outcome.result).inc()
    return outcome


async def _credentials(state: OperatorState, cluster: GpuProxyCluster
                       ) -> tuple[DatabaseCredentials | None, str | None]:
    meta = cluster.metadata
    key = (meta.namespace, meta.name)
    found = await credentials.read(state.kube, state.secrets, key, meta.namespace,
                                   cluster.spec.database.credentials_secret)
    if state.secrets is not None and key not in state.clusters:
        # Deleted (and forgotten) before this reconcile registered its use of the Secret: the
        # watch would otherwise outlive the cluster. (Every live cluster is in state.clusters:
        # its events put it there.)
        state.secrets.forget(key)
    return found


def _credential_dependent(cluster: GpuProxyCluster, inputs: BuildInputs) -> set[reconcile.Key]:
    """The children built from the credentials (the PgBouncer userlist Secret, what mounts or
    hashes it): while the Secret is unusable they keep their last good state."""
    without = {reconcile.key_of(m): m for m in build_all(cluster, inputs)}
    placeholder = dataclasses.replace(inputs, database_credentials=_PLACEHOLDER)
    with_some = {reconcile.key_of(m): m for m in build_all(cluster, placeholder)}
    return {k for k in without.keys() | with_some.keys() if without.get(k) != with_some.get(k)}


def _with_redis_password(cluster: GpuProxyCluster, images: OperandImages,
                         desired: list[dict[str, Any]], hold: set[reconcile.Key],
                         children: dict[reconcile.Key, dict[str, Any]]
                         ) -> tuple[list[dict[str, Any]], set[reconcile.Key]]:
    """The bundled Redis' generated password Secret: created first (Redis and the proxies
    mount it) with a random password while it does not exist, and afterwards never changed
    (held), so a reconcile never rotates the password under running pods."""
    if not needs_generated_secret(cluster):
        return desired, hold  # a generated Secret left over is deleted as no longer wanted
    key = ("Secret", generated_secret_name(cluster))
    if key in children:
        return desired, hold | {key}
    secret = build_generated_redis_secret(with_images(cluster, images), secrets.token_urlsafe(32))
    return [secret, *desired], hold


async def _list_or_error(api: kube.KubeClient, kind: str, ns: str, cluster: str
                         ) -> list[dict[str, Any]] | Exception:
    """A list call whose failure is a value: the gathered tasks never end in an exception, which
    kopf would re-raise at shutdown if a reconcile is cancelled mid-gather."""
    try:
        return await api.list(kind, ns, {CLUSTER_LABEL: cluster})
    except Exception as exc:  # returned to the caller, which re-raises it
        return exc


async def _observe(state: OperatorState, cluster: GpuProxyCluster
                   ) -> tuple[dict[reconcile.Key, dict[str, Any]], dict[str, str]]:
    api, cache = state.kube, state.children_cache
    ns, name, uid = cluster.metadata.namespace, cluster.metadata.name, cluster.metadata.uid
    if cache is not None and cache.usable:
        absent = await cache.missing(api)
        served = [k for k in kube.CHILD_KINDS if k not in absent]
        return cache.children(ns, name, uid, served), absent
    kinds = list(kube.CHILD_KINDS)
    results = await asyncio.gather(*(_list_or_error(api, k, ns, name) for k in kinds))
    children: dict[reconcile.Key, dict[str, Any]] = {}
    missing: dict[str, str] = {}
    for kind, result in zip(kinds, results, strict=True):
        if isinstance(result, kube.MissingAPI):
            missing[kind] = str(result)
        elif isinstance(result, BaseException):
            raise result
        else:
            for obj in result:
                if reconcile.is_controlled_by(obj, uid):
                    children[reconcile.key_of(obj)] = obj
    return children, missing


async def _node_tuning_seen(state: OperatorState, cluster: GpuProxyCluster
                            ) -> TuningSeen | None:
    """The platform's node-tuning DaemonSet, for a cluster that asks for tuned nodes."""
    ref = state.platform.node_tuning
    if ref is None or not cluster.spec.node_tuning.enabled:
        return None
    probe = state.node_tuning_probe
    if probe is None or probe.ref != ref:
        probe = state.node_tuning_probe = NodeTuningProbe(ref, state.node_tuning_ttl)
    return await probe.observe(state.kube)


async def _proxy_replicas(api: kube.KubeClient, cluster: GpuProxyCluster, body: dict[str, Any],
                          children: dict[reconcile.Key, dict[str, Any]]) -> ownership.Ownership:
    """Who owns the proxy replicas and the count this reconcile builds the Deployment with:
    never one the autoscaler or an external HPA owns, except when creating the Deployment."""
    name = cluster.metadata.name
    current = children.get(("Deployment", child_name(name, "proxy")))
    replicas = ((current or {}).get("spec") or {}).get("replicas")
    hpas = await list_autoscalers(api, cluster.metadata.namespace)
    owned = ownership.resolve(cluster, body.get("status") or {},
                              ownership.find_autoscalers(hpas, child_name(name, "proxy"), name),
                              replicas if isinstance(replicas, int) else None)
    if owned.event is not None:
        await kube.post_event(api, body, *owned.event)
    return owned


def _known_body(state: OperatorState, key: ClusterKey, hint: dict[str, Any] | None
                ) -> dict[str, Any] | None:
    """The cluster as its watch last delivered it (or `hint`), or our own status write when
    the watch has not shown it yet; None: read it from the API server. Status writes carry its
    resourceVersion, so a stale copy costs a 409 and a re-read, never a lost update."""
    cache = state.children_cache
    seen = hint if hint is not None else state.clusters.get(key)
    if cache is None or not cache.usable or seen is None:
        return None
    body = cache.resolve(key, (KIND, key[1]), seen)
    return copy.deepcopy(body) if body is not None else None


async def reconcile_cluster(state: OperatorState, key: ClusterKey,
                            logger: logging.Logger | logging.LoggerAdapter[Any],
                            hint: dict[str, Any] | None = None) -> Outcome:
    api = state.kube
    ns, name = key
    body = _known_body(state, key, hint)
    if body is None:
        try:
            body = await api.get(KIND, ns, name)
        except kube.NotFound:
            return Outcome("gone")
    meta = body.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return Outcome("gone")  # children go by owner-reference garbage collection
    generation = meta.get("generation")
    previous = body.get("status") or {}
    # This generation was applied already (not merely seen while paused): differences now are
    # drift, and the Events say Repaired.
    reconciled_before = (generation is not None
                         and previous.get("observedGeneration") == generation
                         and status.condition(previous, "Paused").get("status") != "True")
    if meta.get("uid"):
        state.managed.add(meta["uid"])
        state.metrics.managed_clusters.set(len(state.managed))

    try:
        cluster = parse_cluster(body)
        children, missing = await _observe(state, cluster)
        creds, cred_problem = await _credentials(state, cluster)
        owned = await _proxy_replicas(api, cluster, body, children)
        inputs = BuildInputs(creds, owned.replicas, state.platform.images,
                             state.platform.operator)
        desired = build_all(cluster, inputs)  # everything is built before the first write
        # An unusable Secret must not blank the userlist or roll PgBouncer: keep the last good.
        hold = _credential_dependent(cluster, inputs) if cred_problem else set()
        desired, hold = _with_redis_password(cluster, inputs.images, desired, hold, children)
    except InvalidSpecError as exc:
        # The builders also reject input from other objects (the credentials Secret): name it.
        problems = exc.problems if exc.obj.startswith(KIND) else [
            (f"{exc.obj} {path}", reason) for path, reason in exc.problems]
        obs = status.Observation(generation, paused=bool((body.get("spec") or {}).get("paused")),
                                 invalid=problems, node_tuning=state.platform.node_tuning)
        await _write_status(state, body, obs, logger)
        return Outcome("invalid", str(exc))

    desired = [m for m in desired if m["kind"] not in missing]
    uid = cluster.metadata.uid
    proxy_key = ("Deployment", child_name(name, "proxy"))
    allowed = (meta.get("annotations") or {}).get(ALLOW_REPLACE_ANNOTATION) == str(generation)
    planned = reconcile.plan(desired, children, uid, replicas_key=proxy_key,
                             reconciled_before=reconciled_before, hold=hold,
                             no_replace=set() if allowed else {proxy_key})
    errors = [("ReplacementBlocked", _blocked_message(cluster, b, generation))
              for b in planned.blocked]
    kept = sorted(f"{k} {n}" for k, n in hold if (k, n) in children)
    if cred_problem and kept:
        cred_problem += (f"; until then {', '.join(kept)} keep their last good state "
                         "(PgBouncer keeps running with the current userlist)")
    actions = []
    for action in planned.actions:
        rejected = state.rejected.get((uid, action.kind, action.name))
        if rejected is not None and rejected == action.spec_hash:
            errors.append(("ChildRejected", f"{action.kind} {action.name} was rejected by the "
                           "API server; fix the spec fields named in the earlier event"))
        elif not apply.settled(state, uid, action, children.get(action.key)):
            actions.append(action)

    applied: list[str] = []
    if not cluster.spec.paused:
        applied = await apply.apply(state, body, cluster, actions, children, missing, errors,
                                    logger)
    obs = status.Observation(
        generation, paused=cluster.spec.paused, cluster=cluster, children=children,
        desired=desired, credentials_problem=cred_problem, missing_apis=missing, errors=errors,
        applied=applied, withheld=len(actions) if cluster.spec.paused else 0,
        replicas_owner=owned.status_fields(), node_tuning=state.platform.node_tuning,
        node_tuning_seen=await _node_tuning_seen(state, cluster))
    await _write_status(state, body, obs, logger)
    if cluster.spec.paused:
        return Outcome("paused", f"{len(actions)} change(s) withheld")
    if errors or cred_problem:
        return Outcome("degraded", "; ".join(m for _, m in errors) or cred_problem or "")
    return Outcome("changed" if applied else "converged", "; ".join(applied))


def _blocked_message(cluster: GpuProxyCluster, blocked: reconcile.Blocked,
                     generation: int | None) -> str:
    meta = cluster.metadata
    return (f"{blocked.kind} {blocked.name}: {', '.join(blocked.fields)} changed and cannot be "
            "changed in place; replacing it deletes every proxy pod and drops all client "
            "connections, so it is left as it is (its other changes wait too). To replace it "
            f"now: `kubectl -n {meta.namespace} annotate gpc {meta.name} "
            f"{ALLOW_REPLACE_ANNOTATION}={generation} --overwrite` (this generation of the spec "
            "only); or undo the change")


STATUS_ATTEMPTS = 3


async def _write_status(state: OperatorState, body: dict[str, Any], obs: status.Observation,
                        logger: logging.Logger | logging.LoggerAdapter[Any]) -> None:
    """Patch status only when it changed (guarded by resourceVersion, re-read on a conflict
    with the autoscaler's status writes); post an Event when Degraded or Ready flips."""
    api = state.kube
    meta = body["metadata"]
    for attempt in range(STATUS_ATTEMPTS):
        previous = body.get("status") or {}
        new = status.compute_status(previous, obs, _now())
        patch = status.status_patch(previous, new)
        if patch is None:
            return
        try:
            written = await kube.patch_cluster_status(
                api, meta.get("namespace"), meta["name"], patch,
                resource_version=meta.get("resourceVersion"))
            if state.children_cache is not None:
                state.children_cache.wrote((meta.get("namespace"), meta["name"]),
                                           (KIND, meta["name"]), body, written)
            break
        except kube.NotFound:
            return
        except kube.Conflict:
            if attempt == STATUS_ATTEMPTS - 1:
                raise
            try:
                body = await api.get(KIND, meta.get("namespace"), meta["name"])
            except kube.NotFound:
                return
            meta = body["metadata"]
    before_d, after_d = status.condition(previous, "Degraded"), status.condition(new, "Degraded")
    if after_d.get("status") == "True" and (before_d.get("status"), before_d.get("message")) != (
            "True", after_d.get("message")):
        logger.warning(after_d.get("message", ""))
        await kube.post_event(api, body, "Warning", str(after_d.get("reason")),
                              str(after_d.get("message")))
    before_r, after_r = status.condition(previous, "Ready"), status.condition(new, "Ready")
    if after_r.get("status") == "True" and before_r.get("status") != "True":
        await kube.post_event(api, body, "Normal", "Ready", str(after_r.get("message")))
