"""Applying one reconcile's planned writes to the API server: create, patch, replace (delete
+ create) and delete children, with what each answer means (422, 409, 403, a missing API),
and what the watch caches must remember until the watches show our writes."""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

from gpuproxy_operator import kube, reconcile
from gpuproxy_operator.api.base import KIND
from gpuproxy_operator.api.cluster import GpuProxyCluster
from gpuproxy_operator.naming import GENERATED_ONCE_ANNOTATION

if TYPE_CHECKING:
    from gpuproxy_operator.engine import OperatorState

# kube-apiserver's wording for updates it refuses ("field is immutable", "Forbidden: updates
# to statefulset spec for fields other than ...").
_FROZEN = re.compile(r"immutable|updates to \w+ spec")


async def apply(state: OperatorState, body: dict[str, Any], cluster: GpuProxyCluster,
                actions: list[reconcile.Action], children: dict[reconcile.Key, dict[str, Any]],
                missing: dict[str, str], errors: list[tuple[str, str]],
                logger: logging.Logger | logging.LoggerAdapter[Any]) -> list[str]:
    """Make the writes in order; what each one did (for Events and status), its failures in
    `errors` (the rest proceeds)."""
    api, ns, uid = state.kube, cluster.metadata.namespace, cluster.metadata.uid
    applied: list[str] = []
    for action in actions:
        before = children.get(action.key)
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
            if state.children_cache is not None:
                state.children_cache.invalidate_discovery()
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
        _remember(state, cluster, action.key, before, result, replaced=action.verb == "replace")
        if result is not None:
            children[action.key] = result
            await _check_kept(state, body, uid, action, result)
        state.metrics.child_writes.labels(action.kind, action.reason).inc()
        text = f"{action.kind} {action.name} {action.detail}"
        applied.append(text)
        logger.info(text)
        await kube.post_event(api, body, "Normal", action.reason, text)
    return applied


def _remember(state: OperatorState, cluster: GpuProxyCluster, key: reconcile.Key,
              before: dict[str, Any] | None, after: dict[str, Any] | None, *,
              replaced: bool = False) -> None:
    """Our write, for reads of the cache until the watch delivers it (else the next pass would
    see the old child and write again, or re-create what it just created)."""
    if state.children_cache is not None:
        state.children_cache.wrote((cluster.metadata.namespace, cluster.metadata.name), key,
                                   before, after, replaced=replaced)


def settled(state: OperatorState, uid: str, action: reconcile.Action,
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
    desired = action.body
    annotations = (desired.get("metadata") or {}).get("annotations") or {}
    if annotations.get(GENERATED_ONCE_ANNOTATION) == "true":
        # A generated password in use: re-adopt the Secret, keep its value (a new random one
        # would rotate it under the running pods).
        desired = {**desired, "data": existing.get("data") or {}}
    children[action.key] = await state.kube.patch(
        action.kind, ns, action.name, reconcile.merge_patch(desired, existing))
    cluster = (body["metadata"]["namespace"], body["metadata"]["name"])
    if state.children_cache is not None:
        state.children_cache.wrote(cluster, action.key, None, children[action.key])
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
