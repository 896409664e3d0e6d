"""The real operator (kopf + our handlers) in-process against kmock, with tiny fake controllers
(workload status, ownerReference GC) and helpers to read kmock's request log."""

from __future__ import annotations

import asyncio
import base64
import copy
import itertools
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import kmock
import kopf
import pytest

from gpuproxy_operator import handlers, kube
from gpuproxy_operator.api.base import API_VERSION, GROUP, KIND, PLURAL, SINGULAR, VERSION
from gpuproxy_operator.engine import OperatorState
from gpuproxy_operator.operator_metrics import OperatorMetrics
from gpuproxy_operator.platform import Platform

OPERATOR_AGENTS = ("gpuproxy-operator", "kopf/")
WRITE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
_uids = itertools.count(1)
DEBUG_WRITES = False


def cluster_body(name: str = "demo", namespace: str = "ns1", **spec: Any) -> dict[str, Any]:
    """A small valid GpuProxyCluster (monitoring off unless the test turns it on)."""
    base: dict[str, Any] = {
        "proxy": {
            "replicas": 2,
            "backends": [{"name": "vllm-0", "url": "http://vllm-0.gpu.svc:8000"}],
        },
        "database": {"host": "pg.db.svc", "credentialsSecret": "db-creds"},
        "nodeTuning": {"enabled": True},
        "monitoring": {"prometheusRule": {"enabled": False}},
    }
    base.update(spec)
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{next(_uids)}",
                     "generation": 1, "resourceVersion": "1"},
        "spec": base,
    }


def secret_body(namespace: str, name: str = "db-creds") -> dict[str, Any]:
    enc = {k: base64.b64encode(v.encode()).decode()
           for k, v in {"username": "app", "password": "s3cret"}.items()}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name,
            "namespace": namespace, "resourceVersion": "1"}, "data": enc}


@dataclass
class Cluster:
    """Access to the emulated API server: objects, request log, and writes as a client."""

    server: Any  # kmock.KubernetesEmulator
    ready: bool = True  # what the fake workload controller reports
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def path(self, kind: str, namespace: str, name: str | None = None) -> str:
        return kube.REGISTRY[kind].path(namespace, name)

    async def create(self, body: dict[str, Any]) -> None:
        kind = kube.kind_of(body)
        async with self.server.post(kind.path(body["metadata"]["namespace"]), json=body) as r:
            assert r.status < 400, await r.text()

    async def patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> None:
        headers = {"Content-Type": "application/merge-patch+json"}
        async with self.server.patch(self.path(kind, namespace, name), json=patch,
                                     headers=headers) as r:
            assert r.status < 400, await r.text()

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        async with self.server.delete(self.path(kind, namespace, name)) as r:
            assert r.status < 400, await r.text()

    async def edit_spec(self, namespace: str, name: str, spec: dict[str, Any]) -> None:
        """A user's spec change: the API server would bump metadata.generation."""
        gen = self.get(KIND, namespace, name)["metadata"].get("generation", 1)
        await self.patch(KIND, namespace, name, {"spec": spec, "metadata": {"generation": gen + 1}})

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        res = kube.REGISTRY[kind]
        for (resource, ns, obj_name), obj in self.server.objects.items():
            if (resource.group, resource.plural, ns, obj_name) == (
                    res.group, res.plural, namespace, name) and not obj.deleted:
                return copy.deepcopy(dict(obj.raw))
        raise KeyError((kind, namespace, name))

    def find(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.get(kind, namespace, name)
        except KeyError:
            return None

    def live(self) -> list[dict[str, Any]]:
        return [copy.deepcopy(dict(o.raw)) for o in self.server.objects.values() if not o.deleted]

    def children(self, namespace: str, owner_uid: str) -> dict[tuple[str, str], dict[str, Any]]:
        return {(o["kind"], o["metadata"]["name"]): o for o in self.live()
                if o["metadata"].get("namespace") == namespace
                and any(r.get("uid") == owner_uid
                        for r in o["metadata"].get("ownerReferences", []))}

    def mark(self) -> int:
        return len(list(self.server))

    def operator_writes(self, since: int = 0, *, events: bool = False) -> list[str]:
        out = []
        for req in list(self.server)[since:]:
            agent = req.headers.get("User-Agent", "")
            if req.method.value not in WRITE_METHODS:
                continue
            if not agent.startswith(OPERATOR_AGENTS):
                continue
            if not events and req.resource is not None and req.resource.plural == "events":
                continue
            out.append(f"{req.method.value} {req.url.path}")
            if DEBUG_WRITES:
                print("WRITE", agent, req.method.value, req.url.path, req.data)
        return out

    def events(self, namespace: str) -> list[dict[str, Any]]:
        return [o for o in self.live() if o.get("kind") == "Event"
                and o["metadata"]["namespace"] == namespace]

    # --- fake controllers --------------------------------------------------------------------

    async def _workloads_once(self) -> None:
        for obj in self.live():
            kind = obj.get("kind")
            ns, name = obj["metadata"].get("namespace"), obj["metadata"]["name"]
            if kind in ("Deployment", "StatefulSet"):
                want = obj.get("spec", {}).get("replicas", 1)
                ready = want if self.ready else 0
                status = {"replicas": want, "readyReplicas": ready, "updatedReplicas": want,
                          "availableReplicas": ready}
            elif kind == "DaemonSet":
                status = {"desiredNumberScheduled": 2, "numberReady": 2 if self.ready else 0,
                          "updatedNumberScheduled": 2}
            else:
                continue
            if obj.get("status") != status:
                await self.patch(kind, ns, name, {"status": status})

    async def _gc_once(self) -> None:
        live = self.live()
        owners = {o["metadata"].get("uid") for o in live if o.get("kind") == KIND}
        for obj in live:
            refs = obj["metadata"].get("ownerReferences") or []
            if refs and not any(r.get("uid") in owners for r in refs):
                await self.delete(obj["kind"], obj["metadata"]["namespace"],
                                  obj["metadata"]["name"])

    async def _controllers(self) -> None:
        while True:
            await self._workloads_once()
            await self._gc_once()
            await asyncio.sleep(0.05)


@dataclass
class Operator:
    """Starts and stops the real operator in a thread with its own event loop (kopf cancels
    every task of its loop on exit, which would include pytest's); a restart gets a fresh
    OperatorState. It talks to kmock over HTTP like to any API server."""

    url: str
    resync_seconds: float = 0.3
    platform: Platform = field(default_factory=Platform)
    state: OperatorState | None = None
    _thread: threading.Thread | None = None
    _stop: threading.Event | None = None

    async def start(self, namespaces: tuple[str, ...] = ()) -> OperatorState:
        info = kopf.ConnectionInfo(server=self.url)
        metrics = OperatorMetrics()
        state = self.state = OperatorState(
            kube=kube.KubeClient(on_call=metrics.api_call), metrics=metrics,
            login=lambda **_: info, namespaces=namespaces, resync_seconds=self.resync_seconds,
            consistency_timeout=5.0, platform=self.platform, node_tuning_ttl=0.5)
        stop, ready = threading.Event(), threading.Event()
        self._stop = stop
        self._thread = threading.Thread(target=lambda: asyncio.run(handlers.run_operator(
            state, clusterwide=not namespaces, stop_flag=stop, ready_flag=ready)),
            name="operator", daemon=True)
        self._thread.start()
        assert await asyncio.to_thread(ready.wait, 60), "the operator did not start"
        return state

    async def stop(self) -> None:
        if self._thread is not None and self._stop is not None:
            self._stop.set()
            await asyncio.to_thread(self._thread.join, 30)
            assert not self._thread.is_alive(), "the operator did not stop"
            self._thread = None

    def reconciles(self, trigger: str | None = None) -> float:
        assert self.state is not None
        total = 0.0
        for metric in self.state.metrics.reconciles.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total") and (
                        trigger is None or sample.labels["trigger"] == trigger):
                    total += sample.value
        return total


async def eventually(check: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Poll until `check()` is truthy (returning it) or fail with its last value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = check()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s; last value: {value!r}")
        await asyncio.sleep(0.05)


def condition(obj: dict[str, Any] | None, ctype: str) -> dict[str, Any]:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == ctype:
            return dict(cond)
    return {}


class VersionedEmulator(kmock.KubernetesEmulator):  # type: ignore[misc]
    """kmock plus what kopf relies on to tell its own patches from stale events: every write
    gets a new metadata.resourceVersion, and every created object a uid, as on a real API
    server (kopf's indices key objects by namespace, name and uid: without uids a ConfigMap
    and a Deployment of the same name would be one object to them)."""

    async def _handle(self, request: Any) -> Any:
        if (request.resource is not None and isinstance(request.data, dict)
                and request.action in (kmock.action.CREATE, kmock.action.UPDATE)):
            meta = request.data.setdefault("metadata", {})
            meta["resourceVersion"] = str(next(_versions))
            if request.action == kmock.action.CREATE:
                meta.setdefault("uid", f"kmock-uid-{next(_versions)}")
        return await super()._handle(request)


_versions = itertools.count(1000)


@pytest.fixture
async def api_server() -> AsyncIterator[Any]:
    async with VersionedEmulator() as server, kmock.Server(server):
        yield server


@pytest.fixture
def monitoring_crds() -> bool:
    """Whether the prometheus-operator CRDs are served; tests override it."""
    return True


@pytest.fixture
async def cluster(api_server: Any, monitoring_crds: bool) -> AsyncIterator[Cluster]:
    kmock = api_server
    kmock.resources.load_bundled()
    kmock.resources[f"{GROUP}/{VERSION}/{PLURAL}"] = {
        "kind": KIND, "singular": SINGULAR, "namespaced": True, "shortnames": ["gpc"],
        "categories": [], "subresources": ["status", "scale"],
        "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"],
    }
    if monitoring_crds:
        for plural, kind in (("prometheusrules", "PrometheusRule"),
                             ("servicemonitors", "ServiceMonitor")):
            kmock.resources[f"monitoring.coreos.com/v1/{plural}"] = {
                "kind": kind, "singular": kind.lower(), "namespaced": True, "shortnames": [],
                "categories": [], "subresources": [],
                "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"],
            }
    else:
        for plural in ("prometheusrules", "servicemonitors"):
            key = f"monitoring.coreos.com/v1/{plural}"
            if key in kmock.resources:
                del kmock.resources[key]
    env = Cluster(kmock)
    env.tasks.append(asyncio.create_task(env._controllers()))
    yield env
    for task in env.tasks:
        task.cancel()
    await asyncio.gather(*env.tasks, return_exceptions=True)


@pytest.fixture
async def operator(api_server: Any, cluster: Cluster) -> AsyncIterator[Operator]:
    op = Operator(str(api_server.url).rstrip("/"))
    yield op
    await op.stop()


__all__ = ["Cluster", "Operator", "cluster_body", "condition", "eventually", "secret_body"]
