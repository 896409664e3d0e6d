"""What reconcile reads instead of the API server: the children from kopf indices fed by the child
watches, our own recent writes until those watches catch up, and which optional APIs exist."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gpuproxy_operator import kube, reconcile
from gpuproxy_operator.kube import plain

INDEX_PREFIX = "gpuproxy_children_"
# Kinds of core Kubernetes groups are always served; the others (prometheus-operator's) are
# looked up by discovery, at most this often.
BUILTIN_GROUPS = frozenset({"", "apps", "batch", "policy", "networking.k8s.io"})
DISCOVERY_TTL = 300.0
# A write the watch has not echoed within this long is forgotten (the watch is broken or the
# object changed in a way we cannot tell apart): the cache is trusted again.
WRITE_TTL = 30.0
ClusterKey = tuple[str, str]


def index_id(kind: str) -> str:
    return INDEX_PREFIX + kube.REGISTRY[kind].plural


def compact(body: Mapping[str, Any]) -> str:
    """A watched child as compact JSON without managedFields: a string costs a fraction of the
    parsed object's memory, and a child is parsed again only when its cluster reconciles."""
    raw = plain(body)
    (raw.get("metadata") or {}).pop("managedFields", None)
    return json.dumps(raw, separators=(",", ":"))


def _version(obj: Mapping[str, Any] | None) -> str | None:
    return None if obj is None else (obj.get("metadata") or {}).get("resourceVersion")


@dataclass
class _Write:
    older: frozenset[str | None]  # versions the cache may still show that predate our write
    after: dict[str, Any] | None  # the server's answer; None: we deleted it
    at: float


@dataclass
class ChildCache:
    """Filled by handlers.configure (kopf passes the indices to startup handlers); `ready` once
    kopf runs resource handlers, which it does only after the initial listings are indexed."""

    indices: dict[str, Mapping[Any, Iterable[str]]] = field(default_factory=dict)
    ready: bool = False
    clock: Callable[[], float] = time.monotonic
    _writes: dict[ClusterKey, dict[reconcile.Key, _Write]] = field(default_factory=dict)
    _served: dict[tuple[str, str], tuple[float, set[str]]] = field(default_factory=dict)
    # One discovery request at a time: concurrent reconciles wait for it instead of each
    # sending their own when the cached answer expires.
    _discovering: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def usable(self) -> bool:
        return self.ready and set(self.indices) >= set(kube.CHILD_KINDS)

    def attach(self, indices: Mapping[str, Any]) -> None:
        found = {kind: indices.get(index_id(kind)) for kind in kube.CHILD_KINDS}
        self.indices = {kind: index for kind, index in found.items() if index is not None}

    def forget(self, key: ClusterKey) -> None:
        self._writes.pop(key, None)

    def invalidate_discovery(self) -> None:
        self._served.clear()

    async def missing(self, api: kube.KubeClient) -> dict[str, str]:
        """Child kinds the API server does not serve, with why (as a failed list would say)."""
        out: dict[str, str] = {}
        for kind in kube.CHILD_KINDS:
            res = kube.REGISTRY[kind]
            if res.group in BUILTIN_GROUPS:
                continue
            gv = (res.group, res.version)
            async with self._discovering:
                cached = self._served.get(gv)
                if cached is None or self.clock() - cached[0] > DISCOVERY_TTL:
                    cached = (self.clock(), await api.served(*gv))
                    self._served[gv] = cached
            if res.plural not in cached[1]:
                out[kind] = f"discovery {res.api_version}: {res.api_version} {kind} is not served"
        return out

    def children(self, namespace: str, cluster: str, uid: str, kinds: Iterable[str]
                 ) -> dict[reconcile.Key, dict[str, Any]]:
        """The cluster's children as the watches last saw them, with our newer writes on top."""
        out: dict[reconcile.Key, dict[str, Any]] = {}
        for kind in kinds:
            index = self.indices.get(kind)
            if index is None or (namespace, cluster) not in index:
                continue
            for text in index[(namespace, cluster)]:
                obj = json.loads(text)
                obj.setdefault("kind", kind)
                obj.setdefault("apiVersion", kube.REGISTRY[kind].api_version)
                if reconcile.is_controlled_by(obj, uid):
                    out[reconcile.key_of(obj)] = obj
        for key in list(self._writes.get((namespace, cluster), {})):
            obj = self.resolve((namespace, cluster), key, out.get(key))
            if obj is None:
                out.pop(key, None)
            else:
                out[key] = obj
        return out

    def resolve(self, cluster: ClusterKey, key: reconcile.Key, seen: dict[str, Any] | None
                ) -> dict[str, Any] | None:
        """`seen` (the watch's copy), unless it predates a write of ours: then our write's
        result (None: we deleted it)."""
        writes = self._writes.get(cluster, {})
        write = writes.get(key)
        if write is None:
            return seen
        if _version(seen) in write.older and self.clock() - write.at <= WRITE_TTL:
            return write.after
        del writes[key]  # the watch has caught up (or someone wrote after us)
        return seen

    def wrote(self, cluster: ClusterKey, key: reconcile.Key, before: dict[str, Any] | None,
              after: dict[str, Any] | None, *, replaced: bool = False) -> None:
        """Remember a write until the watch shows it. `before` is the object as reconcile saw
        it; a replacement passes through "absent" on its way to the new object."""
        writes = self._writes.setdefault(cluster, {})
        pending = writes.get(key)
        older = {_version(before)} | ({None} if replaced else set())
        if pending is not None and self.clock() - pending.at <= WRITE_TTL:
            older |= pending.older
        writes[key] = _Write(frozenset(older), after, self.clock())
