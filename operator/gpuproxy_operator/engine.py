"""One reconcile of one GpuProxyCluster: observe -> build -> apply -> status, plus the operator's
shared state (client, metrics, per-cluster locks). kopf-free, so handlers stay thin."""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import kopf

from gpuproxy_operator import kube, reconcile, status
from gpuproxy_operator.api.base import KIND
from gpuproxy_operator.api.cluster import GpuProxyCluster, InvalidSpecError, parse_cluster
from gpuproxy_operator.builders import BuildInputs, DatabaseCredentials, build_all
from gpuproxy_operator.naming import CLUSTER_LABEL, child_name
from gpuproxy_operator.operator_metrics import OperatorMetrics

# kube-apiserver's wording for updates it refuses ("field is immutable", "Forbidden: updates
# to statefulset spec for fields other than ...").
_FROZEN = re.compile(r"immutable|updates to \w+ spec")
ClusterKey = tuple[str, str]  # (namespace, name)
LoginFn = Callable[..., kopf.ConnectionInfo | None]
Result = Literal["converged", "changed", "paused", "invalid", "degraded", "gone"]


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
    resync_seconds: float = 60.0
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

    def lock(self, key: ClusterKey) -> asyncio.Lock:
        return self.locks.setdefault(key, asyncio.Lock())

    def forget(self, key: ClusterKey, uid: str) -> None:
        self.locks.pop(key, None)
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
                            logger: logging.Logger | logging.LoggerAdapter[Any]) -> Outcome | None:
    """Reconcile unless one is already queued behind the running one (bursts of child events
    collapse into one extra pass, which sees their latest state)."""
    if key in state.pending:
        return None
    state.pending.add(key)
    async with state.lock(key):
        state.pending.discard(key)
        return await run(state, key, trigger, logger)


async def run(state: OperatorState, key: ClusterKey, trigger: str,
              logger: logging.Logger | logging.LoggerAdapter[Any]) -> Outcome:
    """Reconcile under the cluster's lock (callers hold it), with metrics."""
    started = time.monotonic()
    try:
        outcome = await reconcile_cluster(state, key, logger)
    except kube.KubeError as exc:
        state.metrics.reconciles.labels(trigger, "error").inc()
        state.metrics.errors.labels(type(exc).__name__).inc()
        raise
    finally:
        state.metrics.duration.observe(time.monotonic() - started)
    state.metrics.reconciles.labels(trigger, outcome.result).inc()
    return outcome


async def _credentials(api: kube.KubeClient, cluster: GpuProxyCluster
                       ) -> tuple[DatabaseCredentials | None, str | None]:
    ns, secret = cluster.metadata.namespace, cluster.spec.database.credentials_secret
    fix = (f"create it with `kubectl -n {ns} create secret generic {secret} "
           "--from-literal=username=... --from-literal=password=...`")
    try:
        obj = await api.get("Secret", ns, secret)
    except kube.NotFound:
        return None, f"database credentials Secret {ns}/{secret} not found: {fix}"
    data = obj.get("data") or {}
    values: dict[str, str] = {}
    for k in ("username", "password"):
        if k not in data:
            return None, f"Secret {ns}/{secret} has no key {k!r}: {fix}"
        try:
            values[k] = base64.b64decode(data[k]).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None, f"Secret {ns}/{secret} key {k!r} is not valid base64 UTF-8 text"
    return DatabaseCredentials(values["username"], values["password"]), None


async def _list_or_error(api: kube.KubeClient, kind: str, ns: str, cluster: str
                         ) -> list[dict[str, Any]] | Exception:
    """A list call whose failure is a value: the gathered tasks never end in an exception, which
    kopf would re-raise at shutdown if a reconcile is cancelled mid-gather."""
    try:
        return await api.list(kind, ns, {CLUSTER_LABEL: cluster})
    except Exception as exc:  # returned to the caller, which re-raises it
        return exc


async def _observe(api: kube.KubeClient, cluster: GpuProxyCluster
                   ) -> tuple[dict[reconcile.Key, dict[str, Any]], dict[str, str]]:
    ns, name, uid = cluster.metadata.namespace, cluster.metadata.name, cluster.metadata.uid
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


def _proxy_replicas(cluster: GpuProxyCluster, body: dict[str, Any],
                    children: dict[reconcile.Key, dict[str, Any]]) -> int | None:
    """The autoscaler's decision while it is on; else (None) spec.proxy.replicas."""
    if not cluster.spec.autoscaling.enabled:
        return None
    desired = (body.get("status") or {}).get("desiredReplicas")
    if isinstance(desired, int) and desired > 0:
        return desired
    current = children.get(("Deployment", child_name(cluster.metadata.name, "proxy")))
    replicas = ((current or {}).get("spec") or {}).get("replicas")
    return replicas if isinstance(replicas, int) else None


async def reconcile_cluster(state: OperatorState, key: ClusterKey,
                            logger: logging.Logger | logging.LoggerAdapter[Any]) -> Outcome:
    api = state.kube
    ns, name = key
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
        children, missing = await _observe(api, cluster)
        credentials, cred_problem = await _credentials(api, cluster)
        inputs = BuildInputs(credentials, _proxy_replicas(cluster, body, children))
        desired = build_all(cluster, inputs)  # everything is built before the first write
    except InvalidSpecError as exc:
        # The builders also reject input from other objects (the credentials Secret): name it.
        problems = exc.problems if exc.obj.startswith(KIND) else [
            (f"{exc.obj} {path}", reason) for path, reason in exc.problems]
        obs = status.Observation(generation, paused=bool((body.get("spec") or {}).get("paused")),
                                 invalid=problems)
        await _write_status(api, body, obs, logger)
        return Outcome("invalid", str(exc))

    desired = [m for m in desired if m["kind"] not in missing]
    uid = cluster.metadata.uid
    proxy_key = ("Deployment", child_name(name, "proxy"))
    planned = reconcile.plan(desired, children, uid, replicas_key=proxy_key,
                             reconciled_before=reconciled_before)
    errors: list[tuple[str, str]] = []
    actions = []
    for action in planned.actions:
        rejected = state.rejected.get((uid, action.kind, action.name))
        if rejected is not None and rejected == action.spec_hash:
            errors.append(("ChildRejected", f"{action.kind} {action.name} was rejected by the "
                           "API server; fix the spec fields named in the earlier event"))
        elif not _settled(state, uid, action, children.get(action.key)):
            actions.append(action)

    applied: list[str] = []
    if not cluster.spec.paused:
        applied = await _apply(state, body, cluster, actions, children, missing, errors, logger)
    obs = status.Observation(
        generation, paused=cluster.spec.paused, cluster=cluster, children=children,
        desired=desired, credentials_problem=cred_problem, missing_apis=missing, errors=errors,
        applied=applied, withheld=len(actions) if cluster.spec.paused else 0)
    await _write_status(api, body, obs, logger)
    if cluster.spec.paused:
        return Outcome("paused", f"{len(actions)} change(s) withheld")
    if errors or cred_problem:
        return Outcome("degraded", "; ".join(m for _, m in errors) or cred_problem or "")
    return Outcome("changed" if applied else "converged", "; ".join(applied))


async def _apply(state: OperatorState, body: dict[str, Any], cluster: GpuProxyCluster,
                 actions: list[reconcile.Action], children: dict[reconcile.Key, dict[str, Any]],
                 missing: dict[str, str], errors: list[tuple[str, str]],
                 logger: logging.Logger | logging.LoggerAdapter[Any]) -> list[str]:
    api, ns, uid = state.kube, cluster.metadata.namespace, cluster.metadata.uid
    applied: list[str] = []
    for action in actions:
        try:
            if action.verb == "create":
                result = await api.create(action.body)
            elif action.verb == "patch":
                result = await api.patch(action.kind, ns, action.name, action.body)
            elif action.verb == "replace":
                # An immutable field changed: a merge patch would get 422 on every pass.
                await api.delete(action.kind, ns, action.name)
                children.pop(action.key, None)
                result = await api.create(action.body)
            else:
                await api.delete(action.kind, ns, action.name)
                children.pop(action.key, None)
                result = None
        except kube.Invalid as exc:
            state.rejected[(uid, action.kind, action.name)] = action.spec_hash
            fields = "; ".join(f"{f or action.kind}: {m}" for f, m in exc.causes)
            message = f"{action.kind} {action.name} was rejected by the API server: {fields}"
            if action.verb == "patch" and any(_FROZEN.search(m) for _, m in exc.causes):
                # A field reconcile does not know to be immutable: say how to get unstuck.
                message += (f"; it cannot be changed in place: delete it (`kubectl -n {ns} "
                            f"delete {action.kind.lower()} {action.name}`) and the operator "
                            "re-creates it from the new spec")
            errors.append(("ChildRejected", message))
            await kube.post_event(api, body, "Warning", "ChildRejected", message)
            continue
        except kube.MissingAPI as exc:
            missing[action.kind] = str(exc)
            continue
        except kube.Conflict:
            existing = await _existing(api, action.kind, ns, action.name)
            if existing is None or (existing.get("metadata") or {}).get("deletionTimestamp"):
                raise  # deleted in between, or still terminating: retry soon
            if reconcile.is_controlled_by(existing, uid):
                # Ours, yet not observed: someone removed our cluster label (children are
                # listed by it), or we created it a moment ago. Patch it into shape, else it
                # stays "missing" and every pass re-creates it into this 409.
                await _readopt(state, body, action, existing, children, applied, logger)
                continue
            message = (f"{action.kind} {ns}/{action.name} already exists and is not owned by "
                       f"this {KIND}; delete or rename it")
            errors.append(("NameConflict", message))
            continue
        except kube.Forbidden as exc:
            errors.append(("Forbidden", f"{exc}; check the operator's RBAC (ClusterRole)"))
            continue
        state.rejected.pop((uid, action.kind, action.name), None)
        if result is not None:
            children[action.key] = result
            await _check_kept(state, body, uid, action, result)
        state.metrics.child_writes.labels(action.kind, action.reason).inc()
        text = f"{action.kind} {action.name} {action.detail}"
        applied.append(text)
        logger.info(text)
        await kube.post_event(api, body, "Normal", action.reason, text)
    return applied


def _settled(state: OperatorState, uid: str, action: reconcile.Action,
             observed: dict[str, Any] | None) -> bool:
    """A drift patch the server did not keep last time, for an unchanged child: skip it."""
    entry = state.settled.get((uid, action.kind, action.name))
    if action.verb != "patch" or observed is None or entry is None:
        return False
    want = (action.body.get("spec") or {}).get("replicas")
    if want is not None and want != (observed.get("spec") or {}).get("replicas"):
        return False  # a replica change is still to be made
    return entry == (action.spec_hash, reconcile.fingerprint(observed))


async def _check_kept(state: OperatorState, body: dict[str, Any], uid: str,
                      action: reconcile.Action, result: dict[str, Any]) -> None:
    key = (uid, action.kind, action.name)
    if action.desired is None:
        return
    lost = reconcile.not_kept(result, action.desired, without_replicas=action.without_replicas)
    if not lost:
        state.settled.pop(key, None)
        return
    entry = (action.spec_hash, reconcile.fingerprint(result))
    if state.settled.get(key, ("",))[0] != action.spec_hash:
        shown = ", ".join(lost[:5]) + (f" and {len(lost) - 5} more" if len(lost) > 5 else "")
        await kube.post_event(
            state.kube, body, "Warning", "ChildAltered",
            f"{action.kind} {action.name}: the API server did not keep {shown} (a disabled "
            "feature gate or a mutating admission webhook); not re-applied until the spec or "
            "the object changes")
    state.settled[key] = entry


async def _readopt(state: OperatorState, body: dict[str, Any], action: reconcile.Action,
                   existing: dict[str, Any], children: dict[reconcile.Key, dict[str, Any]],
                   applied: list[str],
                   logger: logging.Logger | logging.LoggerAdapter[Any]) -> None:
    ns = (existing.get("metadata") or {}).get("namespace")
    children[action.key] = await state.kube.patch(
        action.kind, ns, action.name, reconcile.merge_patch(action.body, existing))
    state.metrics.child_writes.labels(action.kind, "Repaired").inc()
    text = f"{action.kind} {action.name} reverted an out-of-band change (labels restored)"
    applied.append(text)
    logger.info(text)
    await kube.post_event(state.kube, body, "Normal", "Repaired", text)


async def _existing(api: kube.KubeClient, kind: str, ns: str, name: str
                    ) -> dict[str, Any] | None:
    try:
        return await api.get(kind, ns, name)
    except kube.NotFound:
        return None


STATUS_ATTEMPTS = 3


async def _write_status(api: kube.KubeClient, body: dict[str, Any], obs: status.Observation,
                        logger: logging.Logger | logging.LoggerAdapter[Any]) -> None:
    """Patch status only when it changed (guarded by resourceVersion, re-read on a conflict
    with the autoscaler's status writes); post an Event when Degraded or Ready flips."""
    meta = body["metadata"]
    for attempt in range(STATUS_ATTEMPTS):
        previous = body.get("status") or {}
        new = status.compute_status(previous, obs, _now())
        patch = status.status_patch(previous, new)
        if patch is None:
            return
        try:
            await kube.patch_cluster_status(api, meta.get("namespace"), meta["name"], patch,
                                            resource_version=meta.get("resourceVersion"))
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
