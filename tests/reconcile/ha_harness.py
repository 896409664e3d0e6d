"""Two operators on one kmock: an emulator that enforces resourceVersion preconditions on Lease
writes (as kube-apiserver does; kmock alone merges any patch) and can cut one client off,
candidates that run the real operator under leader election, and fake proxy /stats servers."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp.web
import kmock
import kopf
import pytest
from kmock._internal.k8s import KubernetesError

from gpuproxy_operator import handlers, kube
from gpuproxy_operator.engine import OperatorState
from gpuproxy_operator.leader import LeaseConfig
from gpuproxy_operator.operator_metrics import OperatorMetrics
from tests.reconcile.conftest import VersionedEmulator

LEASE_NS = "gpuproxy-system"


class LeaseEmulator(VersionedEmulator):
    """A stale metadata.resourceVersion on a Lease write is 409 Conflict, checked and applied
    atomically; requests from a user agent in `cut_off` get 503 (a network partition)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cut_off: set[str] = set()
        self.lease_lock = asyncio.Lock()

    def _stored(self, request: Any) -> dict[str, Any] | None:
        for (resource, ns, name), obj in self.objects.items():
            if ((resource.group, resource.plural, ns, name) == (
                    "coordination.k8s.io", "leases", request.namespace, request.name)
                    and not obj.deleted):
                return dict(obj.raw)
        return None

    async def _handle(self, request: Any) -> Any:
        agent = request.headers.get("User-Agent", "")
        if any(who in agent for who in self.cut_off):
            raise KubernetesError(status=503, reason="ServiceUnavailable", message="cut off")
        res = request.resource
        if res is None or (res.group, res.plural) != ("coordination.k8s.io", "leases"):
            return await super()._handle(request)
        async with self.lease_lock:
            if request.action == kmock.action.UPDATE and isinstance(request.data, dict):
                want = (request.data.get("metadata") or {}).get("resourceVersion")
                have = ((self._stored(request) or {}).get("metadata") or {}).get(
                    "resourceVersion")
                if want is not None and want != have:
                    raise KubernetesError(status=409, reason="Conflict", message=(
                        f"the object has been modified (resourceVersion {want} != {have})"))
            return await super()._handle(request)

    def lease(self, name: str = "gpuproxy-operator") -> dict[str, Any] | None:
        for (resource, ns, obj_name), obj in self.objects.items():
            if (resource.plural, ns, obj_name) == ("leases", LEASE_NS, name) and not obj.deleted:
                return dict(obj.raw)
        return None

    def holder(self, name: str = "gpuproxy-operator") -> str | None:
        return ((self.lease(name) or {}).get("spec") or {}).get("holderIdentity") or None


@pytest.fixture
async def api_server() -> AsyncIterator[Any]:
    """Overrides the harness' api_server (cluster builds on it)."""
    async with LeaseEmulator() as server, kmock.Server(server):
        yield server


def config(identity: str, **timings: float) -> LeaseConfig:
    """Short timings with client-go's proportions (lease > renew deadline > 1.2 x retry)."""
    values = {"lease_duration": 3.0, "renew_deadline": 2.0, "retry_period": 0.5, **timings}
    return LeaseConfig(namespace=LEASE_NS, identity=identity,
                       lease_duration=values["lease_duration"],
                       renew_deadline=values["renew_deadline"],
                       retry_period=values["retry_period"])


def agent(identity: str) -> str:
    return f"gpuproxy-operator ({identity})"


@dataclass
class Candidate:
    """The real operator (kopf + handlers), under leader election unless `election` is None,
    in a thread of its own; its client's user agent names it."""

    url: str
    election: LeaseConfig | None
    resync_seconds: float = 3600.0
    liveness_endpoint: str | None = None
    concurrency: int = 4
    name: str = "op"
    state: OperatorState | None = None
    lost: str | None = None
    stopped_at: float | None = None
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> OperatorState:
        info = kopf.ConnectionInfo(server=self.url)
        metrics = OperatorMetrics()
        identity = self.election.identity if self.election is not None else self.name
        self.state = state = OperatorState(
            kube=kube.KubeClient(on_call=metrics.api_call, user_agent=agent(identity)),
            metrics=metrics, login=lambda **_: info, resync_seconds=self.resync_seconds,
            concurrency=self.concurrency)

        def main() -> None:
            self.lost = asyncio.run(handlers.run_operator(
                state, clusterwide=True, stop_flag=self._stop, election=self.election,
                liveness_endpoint=self.liveness_endpoint))
            self.stopped_at = time.monotonic()

        self._thread = threading.Thread(target=main, name=identity, daemon=True)
        self._thread.start()
        return state

    def crash(self) -> None:
        """As if the process died: nothing it sends reaches the API server any more (so it
        neither writes nor releases the lease), then its loop is stopped."""
        assert self.state is not None
        assert self.state.lease_kube is not None
        self.state.kube.fence("crashed")
        self.state.lease_kube.fence("crashed")
        self._stop.set()

    async def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
            assert not self._thread.is_alive(), "the operator did not stop"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


class StatsServers:
    """`/stats` of fake proxy pods on `ips`: `connections[ip]` active connections each."""

    def __init__(self, ips: list[str], port: int) -> None:
        self.ips, self.port = ips, port
        self.connections: dict[str, int] = dict.fromkeys(ips, 0)
        self._runner: aiohttp.web.AppRunner | None = None

    async def _stats(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        ip = sockname[0] if sockname else ""
        return aiohttp.web.json_response({"connections_active": self.connections.get(ip, 0)})

    async def __aenter__(self) -> StatsServers:
        app = aiohttp.web.Application()
        app.add_routes([aiohttp.web.get("/stats", self._stats)])
        self._runner = aiohttp.web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        for ip in self.ips:
            await aiohttp.web.TCPSite(self._runner, ip, self.port).start()
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
