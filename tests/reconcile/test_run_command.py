"""`gpuproxy-operator run` options and the operator's own /metrics."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpuproxy_operator.api.base import KIND
from gpuproxy_operator.cli import build_parser
from gpuproxy_operator.commands.run import namespaces_from
from gpuproxy_operator.operator_metrics import OperatorMetrics, serve
from tests.reconcile.conftest import Cluster, cluster_body, condition, eventually, secret_body


def parse(*argv: str) -> tuple[str, ...]:
    return namespaces_from(build_parser("run").parse_args(["run", *argv]))


def test_namespaces_from_options_then_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPUPROXY_WATCH_NAMESPACE", raising=False)
    assert parse() == ()
    assert parse("-n", "a", "--namespace", "b") == ("a", "b")
    monkeypatch.setenv("GPUPROXY_WATCH_NAMESPACE", "team-a, team-b")
    assert parse() == ("team-a", "team-b")
    assert parse("--all-namespaces") == ()
    assert parse("-n", "x") == ("x",)
    with pytest.raises(SystemExit):
        parse("-n", "x", "-A")


def test_metrics_are_served_from_their_own_registry() -> None:
    metrics = OperatorMetrics()
    metrics.api_call("patch", "Deployment", "200")
    metrics.reconciles.labels("resync", "converged").inc()
    metrics.managed_clusters.set(2)
    server, thread = serve(metrics, 0, "127.0.0.1")
    try:
        port = server.server_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert 'gpuproxy_operator_api_calls_total{code="200",kind="Deployment",verb="patch"} 1.0' \
        in text
    assert 'gpuproxy_operator_reconciles_total{result="converged",trigger="resync"} 1.0' in text
    assert "gpuproxy_operator_managed_clusters 2.0" in text
    assert "python_gc" not in text  # not the default registry


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_run_command_end_to_end(cluster: Cluster, api_server: Any,
                                      tmp_path: Path) -> None:
    """The real CLI in a subprocess: kubeconfig login, namespace scope, metrics, liveness,
    graceful stop on SIGTERM. (kmock 0.8 cannot parse GET /api/v1/namespaces, which kopf's
    namespace observer retries in namespaced mode; the resync loop reconciles meanwhile.)"""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": str(api_server.url).rstrip("/")}}],
        "users": [{"name": "kmock", "user": {"token": "t"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}],
    }))
    metrics_port, live_port = free_port(), free_port()
    await cluster.create(secret_body("ns1"))
    body = cluster_body()
    await cluster.create(body)
    other = cluster_body("elsewhere", "ns9")
    await cluster.create(other)
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "GPUPROXY_WATCH_NAMESPACE": "ns1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gpuproxy_operator.cli", "run", "--metrics-port", str(metrics_port),
        "--metrics-addr", "127.0.0.1", "--liveness", f"http://127.0.0.1:{live_port}/healthz",
        "--resync-seconds", "1", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        await eventually(lambda: cluster.find("Deployment", "ns1", "demo-proxy") is not None,
                         timeout=30)
        await eventually(lambda: condition(cluster.find(KIND, "ns1", "demo"), "Ready")
                         .get("status") == "True", timeout=30)
        metrics = await asyncio.to_thread(fetch, f"http://127.0.0.1:{metrics_port}/metrics")
        assert 'gpuproxy_operator_api_calls_total{code="200",kind="Deployment",verb="create"}' \
            in metrics
        assert "gpuproxy_operator_managed_clusters 1.0" in metrics
        live = await asyncio.to_thread(fetch, f"http://127.0.0.1:{live_port}/healthz")
        assert "managedClusters" in live
        assert cluster.children("ns9", other["metadata"]["uid"]) == {}  # outside the scope
    finally:
        proc.terminate()
        _, stderr = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 0, stderr.decode()[-3000:]


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode())
