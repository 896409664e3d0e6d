"""The database credentials Secret each cluster names, read from a single-object watch: a list and
watch with fieldSelector metadata.name, as the kubelet watches the Secrets its pods mount.
A password rotation reaches reconcile (and the PgBouncer userlist) within a second, while
no other Secret is listed, streamed or kept in memory; a GET until the watch has synced."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gpuproxy_operator import kube
from gpuproxy_operator.builders import DatabaseCredentials

log = logging.getLogger("gpuproxy_operator.credentials")
ClusterKey = tuple[str, str]
SecretKey = tuple[str, str]  # (namespace, name)
# client-go's reflector: each watch request asks the server to end it after 5-10 minutes.
WATCH_SECONDS = (300, 600)
SYNC_WAIT = 5.0  # how long a reconcile waits for a new watch's first list before a GET
MAX_BACKOFF = 60.0


@dataclass
class Watched:
    """One watched Secret: its data once synced (None: it does not exist), the clusters that
    use it, and the last list/watch failure (the last good data is kept through failures)."""

    synced: asyncio.Event = field(default_factory=asyncio.Event)
    data: dict[str, Any] | None = None
    error: str | None = None
    users: set[ClusterKey] = field(default_factory=set)
    task: asyncio.Task[None] | None = None


class _Relist(Exception):
    """The watch's resourceVersion is too old (410 Gone): list again."""


@dataclass
class SecretWatches:
    """Watches of the Secrets clusters reference, started on first use, stopped when no cluster
    uses them any more; `notify(cluster)` is called when a used Secret changes."""

    client: kube.KubeClient
    notify: Callable[[ClusterKey], None]
    watched: dict[SecretKey, Watched] = field(default_factory=dict)

    def use(self, cluster: ClusterKey, namespace: str, name: str) -> Watched:
        """`cluster` now reads Secret namespace/name (and no other)."""
        key = (namespace, name)
        for other, entry in list(self.watched.items()):
            if other != key and cluster in entry.users:
                entry.users.discard(cluster)
                self._stop_if_unused(other)
        entry = self.watched.setdefault(key, Watched())
        entry.users.add(cluster)
        if entry.task is None or entry.task.done():
            entry.task = asyncio.get_running_loop().create_task(
                self._run(key, entry), name=f"gpuproxy-secret-watch:{namespace}/{name}")
        return entry

    def forget(self, cluster: ClusterKey) -> None:
        for key, entry in list(self.watched.items()):
            entry.users.discard(cluster)
            self._stop_if_unused(key)

    def _stop_if_unused(self, key: SecretKey) -> None:
        entry = self.watched.get(key)
        if entry is not None and not entry.users:
            if entry.task is not None:
                entry.task.cancel()
            del self.watched[key]

    async def close(self) -> None:
        tasks = [e.task for e in self.watched.values() if e.task is not None]
        self.watched.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _store(self, key: SecretKey, entry: Watched, obj: dict[str, Any] | None) -> None:
        data = None if obj is None else dict(obj.get("data") or {})
        changed = entry.synced.is_set() and data != entry.data
        entry.data, entry.error = data, None
        entry.synced.set()
        if changed:
            log.info(f"Secret {key[0]}/{key[1]} changed: re-reconciling {len(entry.users)} "
                     "cluster(s)")
            for cluster in list(entry.users):
                self.notify(cluster)

    async def _run(self, key: SecretKey, entry: Watched) -> None:
        """List, then watch from the list's version, re-watch when the server ends the watch,
        list again after 410 Gone or a failure; never ends on an error (kopf would re-raise
        it at shutdown)."""
        namespace, name = key
        selector = {"fieldSelector": f"metadata.name={name}"}
        version: str | None = None
        backoff = 1.0
        while True:
            try:
                if version is None:
                    listing = await self.client.request("list", kube.REGISTRY["Secret"],
                                                        namespace, params=selector)
                    # Filtered here too: not every server (or test double) honours selectors.
                    items = [i for i in listing.get("items") or []
                             if (i.get("metadata") or {}).get("name") == name]
                    self._store(key, entry, items[0] if items else None)
                    version = str((listing.get("metadata") or {}).get("resourceVersion") or "0")

                async def on_event(event: dict[str, Any]) -> None:
                    nonlocal version
                    obj = event.get("object") or {}
                    meta = obj.get("metadata") or {}
                    if event.get("type") == "ERROR":
                        if obj.get("code") == 410:
                            raise _Relist
                        raise kube.Transient("watch", f"Secret {namespace}/{name}",
                                             int(obj.get("code") or 0), str(obj.get("message")))
                    version = meta.get("resourceVersion") or version
                    if event.get("type") != "BOOKMARK" and meta.get("name") == name:
                        self._store(key, entry, None if event.get("type") == "DELETED" else obj)

                seconds = random.randint(*WATCH_SECONDS)  # noqa: S311  # jitter, not a secret
                await self.client.watch(
                    "Secret", namespace, {**selector, "resourceVersion": version,
                                          "allowWatchBookmarks": "true",
                                          "timeoutSeconds": str(seconds)},
                    on_event, seconds=seconds + 30)
                backoff = 1.0
            except _Relist:
                version = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a long-lived loop: report, back off, list again
                entry.error = f"cannot watch Secret {namespace}/{name}: {exc}"
                log.warning(f"{entry.error}; retrying in {backoff:.0f}s")
                version = None
                await asyncio.sleep(backoff)
                backoff = min(MAX_BACKOFF, backoff * 2)


def decode(namespace: str, secret: str, data: dict[str, Any] | None
           ) -> tuple[DatabaseCredentials | None, str | None]:
    """The credentials in a Secret's data, or what is wrong with it and what to do."""
    fix = (f"create it with `kubectl -n {namespace} create secret generic {secret} "
           "--from-literal=username=... --from-literal=password=...`")
    if data is None:
        return None, f"database credentials Secret {namespace}/{secret} not found: {fix}"
    values: dict[str, str] = {}
    for k in ("username", "password"):
        if k not in data:
            return None, f"Secret {namespace}/{secret} has no key {k!r}: {fix}"
        try:
            values[k] = base64.b64decode(data[k]).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None, f"Secret {namespace}/{secret} key {k!r} is not valid base64 UTF-8 text"
    return DatabaseCredentials(values["username"], values["password"]), None


async def read(client: kube.KubeClient, watches: SecretWatches | None, cluster: ClusterKey,
               namespace: str, secret: str) -> tuple[DatabaseCredentials | None, str | None]:
    """The cluster's credentials (from the watch once synced, else a GET), or the problem. A
    Secret the operator may not read is a problem to report, not an error to retry."""
    if watches is not None:
        entry = watches.use(cluster, namespace, secret)
        if not entry.synced.is_set() and entry.error is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(entry.synced.wait(), SYNC_WAIT)
        if entry.synced.is_set():
            return decode(namespace, secret, entry.data)
    try:
        obj = await client.get("Secret", namespace, secret)
    except kube.NotFound:
        return decode(namespace, secret, None)
    except kube.Forbidden as exc:
        return None, (f"cannot read database credentials Secret {namespace}/{secret}: {exc}; "
                      f"grant the operator get, list and watch on secrets in {namespace} "
                      "(the chart's RBAC does)")
    return decode(namespace, secret, obj.get("data") or {})
