"""`gpuproxy-operator run` options and the operator's own /metrics."""

from __future__ import annotations

import urllib.request

import pytest

from gpuproxy_operator.cli import build_parser
from gpuproxy_operator.commands.run import namespaces_from
from gpuproxy_operator.operator_metrics import OperatorMetrics, serve


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
