"""API load and memory of the operator with many converged clusters, against kmock on loopback.

Starts kmock (resourceVersions and uids on writes, as a real API server) with tiny fake
controllers for workload status, creates N GpuProxyClusters and their credentials Secrets,
runs `gpuproxy-operator run` from a source tree (`--source`, e.g. a worktree of another commit)
as a child process, waits until every cluster is Ready, then counts the operator's requests in
kmock's log over a window (user agents `gpuproxy-operator*` and `kopf/*`) and reads its RSS.
Everything it starts is ended by PID; the whole run is bounded by `--timeout`.

    .venv/bin/python bench/operator_api_load.py --clusters 100 --window 180
    .venv/bin/python bench/operator_api_load.py --source /tmp/head/operator --clusters 100
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kmock

ROOT = Path(__file__).resolve().parent.parent
GROUP, VERSION, PLURAL, KIND = "gpuproxy.aiserve.farm", "v1alpha1", "gpuproxyclusters", \
    "GpuProxyCluster"
AGENTS = ("gpuproxy-operator", "kopf/")
_serial = itertools.count(1000)


@dataclass(frozen=True)
class Logged:
    """What the bench keeps of a request."""

    agent: str
    method: str
    path: str
    watch: bool


class Emulator(kmock.KubernetesEmulator):  # type: ignore[misc]
    """A new resourceVersion on every write and a uid on every create (kopf relies on both).
    kmock matches every request against its whole request log, which makes a long run
    quadratic: the bench keeps a small log of its own, and kmock's holds only the requests in
    flight."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log: list[Logged] = []

    async def _handle(self, request: Any) -> Any:
        try:
            return await self._serve(request)
        finally:
            # kmock's log keeps only the requests in flight (matching needs those); its
            # reactions' own logs nothing.
            for i in range(len(self._requests) - 1, -1, -1):
                if self._requests[i] is request:
                    del self._requests[i]
                    break
            for payload in self._payloads:
                payload._requests.clear()

    async def _serve(self, request: Any) -> Any:
        self.log.append(Logged(request.headers.get("User-Agent", ""), request.method.value,
                               request.url.path,
                               request.url.query.get("watch") in ("true", "1")))
        if (request.resource is not None and isinstance(request.data, dict)
                and request.action in (kmock.action.CREATE, kmock.action.UPDATE)):
            meta = request.data.setdefault("metadata", {})
            meta["resourceVersion"] = str(next(_serial))
            if request.action == kmock.action.CREATE:
                meta.setdefault("uid", f"uid-{next(_serial)}")
        return await super()._handle(request)


def register(server: Any) -> None:
    server.resources.load_bundled()
    verbs = ["get", "list", "watch", "create", "update", "patch", "delete"]
    server.resources[f"{GROUP}/{VERSION}/{PLURAL}"] = {
        "kind": KIND, "singular": "gpuproxycluster", "namespaced": True, "shortnames": ["gpc"],
        "categories": [], "subresources": ["status", "scale"], "verbs": verbs}
    for plural, kind in (("prometheusrules", "PrometheusRule"),
                         ("servicemonitors", "ServiceMonitor")):
        server.resources[f"monitoring.coreos.com/v1/{plural}"] = {
            "kind": kind, "singular": kind.lower(), "namespaced": True, "shortnames": [],
            "categories": [], "subresources": [], "verbs": verbs}


def cluster(name: str, namespace: str) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
            "metadata": {"name": name, "namespace": namespace, "generation": 1},
            "spec": {"proxy": {"replicas": 2, "backends": [
                {"name": "vllm-0", "url": "http://vllm-0.gpu.svc:8000"}]},
                "database": {"host": "pg.db.svc", "credentialsSecret": "db-creds"}}}


def secret(namespace: str) -> dict[str, Any]:
    data = {k: base64.b64encode(v.encode()).decode()
            for k, v in {"username": "app", "password": "s3cret"}.items()}
    return {"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "db-creds", "namespace": namespace}, "data": data}


class Api:
    """The bench's own client of kmock (its requests carry no operator user agent)."""

    def __init__(self, server: Any) -> None:
        self.server = server

    async def create(self, path: str, body: dict[str, Any]) -> None:
        async with self.server.post(path, json=body, headers={"User-Agent": "bench"}) as r:
            assert r.status < 400, await r.text()

    async def patch(self, path: str, body: dict[str, Any]) -> None:
        headers = {"Content-Type": "application/merge-patch+json", "User-Agent": "bench"}
        async with self.server.patch(path, json=body, headers=headers) as r:
            assert r.status < 400, await r.text()


def live(server: Any) -> list[dict[str, Any]]:
    return [dict(o.raw) for o in server.objects.values() if not o.deleted]


async def controllers(server: Any, api: Api) -> None:
    """Deployments/StatefulSets report their replicas ready, DaemonSets two nodes."""
    paths = {"Deployment": "deployments", "StatefulSet": "statefulsets",
             "DaemonSet": "daemonsets"}
    while True:
        for obj in live(server):
            kind = obj.get("kind")
            if kind not in paths:
                continue
            if kind == "DaemonSet":
                status = {"desiredNumberScheduled": 2, "numberReady": 2,
                          "updatedNumberScheduled": 2}
            else:
                want = (obj.get("spec") or {}).get("replicas", 1)
                status = {"replicas": want, "readyReplicas": want, "updatedReplicas": want,
                          "availableReplicas": want}
            gen = obj["metadata"].get("generation")
            if gen is not None:
                status["observedGeneration"] = gen
            if obj.get("status") != status:
                meta = obj["metadata"]
                await api.patch(f"/apis/apps/v1/namespaces/{meta['namespace']}/{paths[kind]}/"
                                f"{meta['name']}", {"status": status})
        await asyncio.sleep(1.0)


def ready_count(server: Any) -> int:
    count = 0
    for obj in live(server):
        if obj.get("kind") != KIND:
            continue
        conds = {c.get("type"): c.get("status") for c in
                 (obj.get("status") or {}).get("conditions") or []}
        count += conds.get("Ready") == "True"
    return count


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def classify(req: Logged) -> str:
    """"verb resource[/subresource]", e.g. "list deployments", "patch gpuproxyclusters/status";
    lease traffic apart ("lease ...")."""
    parts = [p for p in req.path.split("/") if p]
    rest = parts[2:] if parts[:1] == ["api"] else parts[3:]
    if rest[:1] == ["namespaces"] and len(rest) >= 3:
        rest = rest[2:]
    resource = (rest[0] if rest else "discovery") + (f"/{rest[2]}" if len(rest) >= 3 else "")
    if req.watch:
        verb = "watch"
    else:
        verb = {"GET": "get" if len(rest) >= 2 else "list", "POST": "create",
                "PATCH": "patch", "PUT": "update", "DELETE": "delete"}.get(req.method, "?")
    return f"{'lease ' if resource == 'leases' else ''}{verb} {resource}"


def window_counts(server: Emulator, since: int) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for req in server.log[since:]:
        if req.agent.startswith(AGENTS):
            who = "kopf" if req.agent.startswith("kopf/") else "operator"
            counts[f"{who}: {classify(req)}"] += 1
    return counts


async def run(args: argparse.Namespace) -> dict[str, Any]:
    async with Emulator() as server, kmock.Server(server):
        register(server)
        api = Api(server)
        url = str(server.url).rstrip("/")
        namespaces = [f"team-{i}" for i in range((args.clusters + args.per_namespace - 1)
                                                  // args.per_namespace)]
        for ns in namespaces:
            await api.create(f"/api/v1/namespaces/{ns}/secrets", secret(ns))
        for i in range(args.clusters):
            ns = namespaces[i // args.per_namespace]
            await api.create(f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}",
                             cluster(f"gpc-{i}", ns))
        fake = asyncio.create_task(controllers(server, api))
        workdir = Path(tempfile.mkdtemp(prefix="operator-api-load-"))
        kubeconfig = workdir / "kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": url}}],
            "users": [{"name": "kmock", "user": {"token": "t"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}]}))
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PYTHONPATH": str(args.source),
               "POD_NAME": "bench-operator", "POD_NAMESPACE": "gpuproxy-system"}
        for var in [k for k in env if k.startswith("GPUPROXY_")]:
            del env[var]
        cmd = [sys.executable, "-m", "gpuproxy_operator.cli", "run", "--all-namespaces",
               "--metrics-port", "0", "--liveness", f"http://127.0.0.1:{free_port()}/healthz",
               *args.operator_args]
        log = (workdir / "operator.log").open("wb")
        proc = await asyncio.create_subprocess_exec(*cmd, env=env, stdout=log,
                                                    stderr=subprocess.STDOUT)
        started = time.monotonic()
        result: dict[str, Any] = {"clusters": args.clusters, "source": str(args.source),
                                  "operator_args": args.operator_args}
        try:
            while ready_count(server) < args.clusters:
                if proc.returncode is not None:
                    raise RuntimeError(f"the operator exited ({proc.returncode}); see {log.name}")
                if time.monotonic() - started > args.timeout:
                    raise TimeoutError(f"{ready_count(server)}/{args.clusters} Ready after "
                                       f"{args.timeout:.0f}s; see {log.name}")
                await asyncio.sleep(2.0)
            result["seconds_to_ready"] = round(time.monotonic() - started, 1)
            result["requests_to_ready"] = sum(window_counts(server, 0).values())
            await asyncio.sleep(args.settle)
            mark, t0 = len(server.log), time.monotonic()
            await asyncio.sleep(args.window)
            minutes = (time.monotonic() - t0) / 60
            counts = window_counts(server, mark)
            lease = sum(v for k, v in counts.items() if ": lease " in k)
            total = sum(counts.values())
            result.update({
                "window_seconds": round(minutes * 60, 1),
                "requests_per_minute": round(total / minutes, 2),
                "requests_per_cluster_per_minute": round(total / minutes / args.clusters, 3),
                "lease_requests_per_minute": round(lease / minutes, 2),
                "requests_per_cluster_per_minute_without_lease":
                    round((total - lease) / minutes / args.clusters, 3),
                "breakdown_per_minute": {k: round(v / minutes, 2)
                                         for k, v in counts.most_common()},
                "rss_mib": round(rss_kib(proc.pid)["VmRSS"] / 1024, 1),
                "peak_rss_mib": round(rss_kib(proc.pid)["VmHWM"] / 1024, 1),
            })
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), 30)
                except TimeoutError:
                    proc.kill()
                    await asyncio.wait_for(proc.wait(), 10)
            log.close()
            fake.cancel()
            await asyncio.gather(fake, return_exceptions=True)
        return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clusters", type=int, default=100)
    parser.add_argument("--per-namespace", type=int, default=10)
    parser.add_argument("--window", type=float, default=180.0,
                        help="seconds of converged operation counted")
    parser.add_argument("--settle", type=float, default=30.0,
                        help="seconds between all Ready and the window")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds allowed until every cluster is Ready")
    parser.add_argument("--source", type=Path, default=ROOT / "operator",
                        help="the operator's source root (PYTHONPATH of the child)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("operator_args", nargs="*",
                        help="extra `run` arguments, after --, e.g. -- --resync-seconds 60")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
