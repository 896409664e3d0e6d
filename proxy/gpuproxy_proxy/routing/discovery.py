"""Backend discovery: LIST then WATCH discovery.k8s.io/v1 EndpointSlices per source, with the
proxy's own ServiceAccount. Ready, non-terminating endpoints become backends; the supervisor
publishes them as backends.json for its workers, a single process applies them directly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from gpuproxy_proxy.config import BackendConfig, DiscoveryConfig, DiscoverySourceConfig

log = logging.getLogger("gpuproxy.discovery")

SNAPSHOT_NAME = "backends.json"
_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
_BACKOFF_START = 0.5
_BACKOFF_MAX = 10.0
_NAME_BAD = re.compile(r"[^a-z0-9-]+")


class Gone(Exception):
    """The watch's resourceVersion is too old (410): list again."""


def backend_name(source: str, ip: str, port: int) -> str:
    """Deterministic and within the backend name pattern (63 chars, DNS-label-like)."""
    raw = _NAME_BAD.sub("-", f"{source}-{ip}-{port}".lower())
    return raw[:63].strip("-")


def _slice_port(item: dict[str, Any], source: DiscoverySourceConfig) -> int | None:
    ports = item.get("ports") or []
    if isinstance(source.port, int):
        return source.port
    if source.port is None:
        return int(ports[0]["port"]) if len(ports) == 1 and ports[0].get("port") else None
    for port in ports:
        if port.get("name") == source.port and port.get("port"):
            return int(port["port"])
    return None


def slice_backends(item: dict[str, Any], source: DiscoverySourceConfig) -> list[BackendConfig]:
    """The endpoints of one EndpointSlice that may take new requests. A terminating endpoint
    is left out (its in-flight streams go on: dropping it from the pool cuts no connection)."""
    port = _slice_port(item, source)
    if port is None:
        return []
    out = []
    for endpoint in item.get("endpoints") or []:
        cond = endpoint.get("conditions") or {}
        # Kubernetes: an unset ready means unknown, to be read as ready.
        if cond.get("ready") is False or cond.get("terminating") is True:
            continue
        for address in (endpoint.get("addresses") or [])[:1]:
            host = f"[{address}]" if ":" in address else address
            out.append(BackendConfig(
                name=backend_name(source.name, address, port),
                url=f"{source.scheme}://{host}:{port}",
                weight=source.weight, health_path=source.health_path,
                labels={"discovery": source.name}))
    return out


class SourceWatcher:
    """One source's slices by name, kept current by LIST + WATCH."""

    def __init__(self, source: DiscoverySourceConfig, changed: Callable[[], None]) -> None:
        self.source = source
        self.changed = changed
        self.slices: dict[str, list[BackendConfig]] = {}

    def backends(self) -> list[BackendConfig]:
        return [b for name in sorted(self.slices) for b in self.slices[name]]

    def _set(self, items: dict[str, list[BackendConfig]]) -> None:
        if items != self.slices:
            self.slices = items
            self.changed()

    async def run(self, client: ApiClient) -> None:
        delay = _BACKOFF_START
        while True:
            try:
                rv = await self._list(client)
                delay = _BACKOFF_START
                while True:
                    rv = await self._watch(client, rv)
            except Gone:
                log.info("discovery %s: watch expired (410), listing again", self.source.name)
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError, KeyError) as exc:
                # Keep the last known backends: an API outage must not empty the pool.
                log.warning("discovery %s: %s: %s (retrying in %.1fs)", self.source.name,
                            type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)

    async def _list(self, client: ApiClient) -> str:
        body = await client.get_json({"labelSelector": self.source.label_selector})
        items = {i["metadata"]["name"]: slice_backends(i, self.source)
                 for i in body.get("items") or []}
        self._set(items)
        return str(body["metadata"]["resourceVersion"])

    async def _watch(self, client: ApiClient, rv: str) -> str:
        params = {"labelSelector": self.source.label_selector, "watch": "1",
                  "resourceVersion": rv, "allowWatchBookmarks": "true",
                  "timeoutSeconds": str(client.config.api.watch_timeout_seconds)}
        async for event in client.watch(params):
            kind = event.get("type")
            obj = event.get("object") or {}
            if kind == "ERROR":
                if obj.get("code") == 410:
                    raise Gone()
                raise ValueError(f"watch error: {obj.get('message')}")
            rv = str(obj.get("metadata", {}).get("resourceVersion") or rv)
            if kind == "BOOKMARK":
                continue
            name = obj["metadata"]["name"]
            items = dict(self.slices)
            if kind == "DELETED":
                items.pop(name, None)
            else:
                items[name] = slice_backends(obj, self.source)
            self._set(items)
        return rv  # the server ended the watch (timeoutSeconds): watch again from here


class ApiClient:
    """GETs against the API server; the token is re-read on each request (it rotates)."""

    def __init__(self, config: DiscoveryConfig) -> None:
        self.config = config
        api = config.api
        base = api.url or ("https://" + os.environ.get("KUBERNETES_SERVICE_HOST", "") + ":"
                           + os.environ.get("KUBERNETES_SERVICE_PORT", "443"))
        namespace = config.namespace or _NAMESPACE_FILE.read_text(encoding="utf-8").strip()
        self.url = URL(base.rstrip("/")) / "apis/discovery.k8s.io/v1/namespaces" / namespace \
            / "endpointslices"
        self.ssl: ssl.SSLContext | bool = True
        if self.url.scheme == "https" and api.ca_file.exists():
            self.ssl = ssl.create_default_context(cafile=str(api.ca_file))
        self.session = aiohttp.ClientSession(trust_env=False,
                                             cookie_jar=aiohttp.DummyCookieJar())

    def _headers(self) -> dict[str, str]:
        try:
            token = self.config.api.token_file.read_text(encoding="utf-8").strip()
        except OSError:
            return {}
        return {"Authorization": f"Bearer {token}"} if token else {}

    async def get_json(self, params: dict[str, str]) -> dict[str, Any]:
        async with self.session.get(self.url, params=params, headers=self._headers(),
                                    ssl=self.ssl,
                                    timeout=aiohttp.ClientTimeout(total=30)) as resp:
            if resp.status == 410:
                raise Gone()
            resp.raise_for_status()
            data: dict[str, Any] = await resp.json(content_type=None)
            return data

    async def watch(self, params: dict[str, str]) -> Any:
        # Idle reads: bookmarks come about once a minute; past the watch's own timeout,
        # something is wrong with the connection.
        limit = self.config.api.watch_timeout_seconds + 30
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=limit)
        async with self.session.get(self.url, params=params, headers=self._headers(),
                                    ssl=self.ssl, timeout=timeout) as resp:
            if resp.status == 410:
                raise Gone()
            resp.raise_for_status()
            while line := await resp.content.readline():
                if line.strip():
                    yield json.loads(line)

    async def close(self) -> None:
        await self.session.close()


class DiscoveryWatcher:
    """All sources; calls `publish` with every discovered backend whenever one changes."""

    def __init__(self, config: DiscoveryConfig,
                 publish: Callable[[list[BackendConfig]], None]) -> None:
        self.config = config
        self.publish = publish
        self.watchers = [SourceWatcher(s, self._changed) for s in config.sources]

    def _changed(self) -> None:
        seen: set[str] = set()
        merged = []
        for watcher in self.watchers:
            for backend in watcher.backends():
                if backend.name not in seen:  # one IP in two slices of a source: once
                    seen.add(backend.name)
                    merged.append(backend)
        self.publish(merged)

    async def run(self) -> None:
        try:
            client = ApiClient(self.config)
        except OSError as exc:  # no namespace configured and none mounted: not in a pod
            log.error("backend discovery is off: %s (set discovery.namespace)", exc)
            return
        try:
            await asyncio.gather(*(w.run(client) for w in self.watchers))
        finally:
            await client.close()


def write_backends(path: Path, backends: list[BackendConfig]) -> None:
    """Replace the file in one rename: a worker reads the old or the new list, whole."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps([b.model_dump(mode="json") for b in backends]), encoding="utf-8")
    os.replace(tmp, path)


def read_backends(path: Path) -> list[BackendConfig]:
    return [BackendConfig.model_validate(b)
            for b in json.loads(path.read_text(encoding="utf-8"))]


def file_publisher(path: Path) -> Callable[[list[BackendConfig]], None]:
    def publish(backends: list[BackendConfig]) -> None:
        try:
            write_backends(path, backends)
        except OSError as exc:
            log.warning("cannot write the discovered backends: %s", exc)
    return publish
