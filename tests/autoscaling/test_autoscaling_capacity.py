"""The capacity plan and `gpuproxy-operator plan`: the guide's 1M sizing and its warnings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpuproxy_operator.api.cluster import GpuProxyClusterSpec
from gpuproxy_operator.autoscaling.capacity import (
    KERNEL_KIB_PER_SOCKET,
    MEMORY_SOURCE,
    USER_KIB_PER_CONNECTION,
    plan,
    quantity_bytes,
    redis_bytes,
)
from gpuproxy_operator.cli import main as cli

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def spec(**overrides: Any) -> GpuProxyClusterSpec:
    body: dict[str, Any] = {
        "proxy": {"backends": [{"name": "gpu", "url": "http://gpu:8000"}]},
        "database": {"host": "pg", "credentialsSecret": "db"},
        "autoscaling": {"enabled": True},
        "pgbouncer": {"replicas": 2, "maxDbConnections": 240, "defaultPoolSize": 200},
    }
    for key, value in overrides.items():
        body[key] = {**body.get(key, {}), **value}
    return GpuProxyClusterSpec.model_validate(body)


def test_a_million_with_room_to_spare_has_no_warnings() -> None:
    p = plan(spec(autoscaling={"maxReplicas": 13}), 1_000_000)
    assert (p.replicas, p.replicas_unbounded, p.target_per_replica) == (13, 13, 80_000)
    # 2 sockets per connection over 4 workers + 1024 upstream pool + 1024 base, per worker.
    assert p.fds_per_worker == 200_000 // 4 + 1024 + 1024
    assert p.fds_per_replica == 4 * p.fds_per_worker
    # 5 idle processes x 72 MiB + 100k x (2.55 KiB user + 2 x 4 KiB kernel) ~ 1.4 GiB, under
    # the derived limit (x 1.2 margin x 1.5).
    assert p.memory_per_replica_bytes == int(5 * 72 * 1024**2 + 100_000 * (2.55 + 8) * 1024)
    assert p.memory_limit_bytes == 2503 * 1024**2
    assert p.pgbouncer_server_connections == 480
    assert p.warnings == []
    # What each component requests at this target (derived: no resources in the spec).
    sizes = {s.name: s for s in p.resources}
    assert (sizes["proxy"].pods, sizes["proxy"].requests) == (13, {"cpu": "3",
                                                                   "memory": "1669Mi"})
    assert (sizes["pgbouncer"].pods, sizes["pgbouncer"].limits["cpu"]) == (2, "1")
    assert sizes["redis"].pods == 1
    assert all(s.derived for s in p.resources)


def test_max_replicas_too_low_for_the_target_is_a_warning_naming_the_fields() -> None:
    p = plan(spec(autoscaling={"maxReplicas": 8}), 1_000_000)
    assert p.replicas == 8
    assert any("spec.autoscaling.maxReplicas 8" in w and "at least 10" in w
               for w in p.warnings)


def test_no_headroom_and_target_connections_warnings() -> None:
    p = plan(spec(autoscaling={"maxReplicas": 10}), 1_000_000)
    assert any("no headroom" in w for w in p.warnings)
    p = plan(spec(autoscaling={"maxReplicas": 30, "targetConnections": 500_000}), 1_000_000)
    assert any("targetConnections 500000" in w for w in p.warnings)


def test_pgbouncer_over_postgres_max_connections() -> None:
    p = plan(spec(pgbouncer={"maxDbConnections": 500, "defaultPoolSize": 500},
                  autoscaling={"maxReplicas": 13}), 1_000_000)
    assert p.pgbouncer_server_connections == 1000
    assert any("maxDbConnections to 248" in w for w in p.warnings)


def test_autoscaling_off_uses_spec_replicas() -> None:
    p = plan(spec(autoscaling={"enabled": False}, proxy={"replicas": 3}), 1_000_000)
    assert p.replicas == 3
    assert any("spec.proxy.replicas 3" in w for w in p.warnings)


def test_grace_period_override_shorter_than_the_longest_request_is_a_warning() -> None:
    p = plan(spec(autoscaling={"maxReplicas": 13},
                  proxy={"terminationGracePeriodSeconds": 120}), 1_000_000)
    [warning] = p.warnings
    assert "terminationGracePeriodSeconds 120" in warning
    assert "= 630" in warning
    assert "still running 90 s after its drain delay" in warning
    ok = plan(spec(autoscaling={"maxReplicas": 13}, proxy={
        "terminationGracePeriodSeconds": 120, "upstream": {"maxRequestSeconds": 90}}), 1_000_000)
    assert ok.warnings == []


def test_memory_limit_and_redis_warnings() -> None:
    p = plan(spec(autoscaling={"maxReplicas": 13},
                  proxy={"resources": {"limits": {"memory": "1Gi"}}},
                  redis={"maxmemory": "100mb"}), 1_000_000)
    assert any("limits.memory 1Gi" in w for w in p.warnings)
    assert any("spec.redis.maxmemory 100mb" in w for w in p.warnings)


def test_sysctls_missing_from_node_tuning() -> None:
    # Asked for: the platform's node tuning sets all of them (the chart's allowlist).
    p = plan(spec(autoscaling={"maxReplicas": 13}), 1_000_000)
    assert p.sysctls_missing == {}
    off = plan(spec(autoscaling={"maxReplicas": 13}, nodeTuning={"enabled": False}), 1_000_000)
    assert "net.core.somaxconn" in off.sysctls_missing
    assert {"fs.nr_open", "fs.file-max", "net.netfilter.nf_conntrack_max"} <= set(
        off.sysctls_missing)
    # Off is a documented choice (nodes tuned through their image): listed, not a warning.
    assert not off.node_tuning
    assert off.warnings == []


@pytest.mark.parametrize(("value", "expected"), [
    ("16gb", 16 * 1024**3), ("16g", 16 * 10**9), ("100mb", 100 * 1024**2), ("42", 42)])
def test_redis_bytes(value: str, expected: int) -> None:
    assert redis_bytes(value) == expected


def test_quantity_bytes() -> None:
    assert quantity_bytes("20Gi") == 20 * 1024**3
    assert quantity_bytes("512M") == 512 * 10**6
    assert quantity_bytes("") is None


def test_plan_command_text_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["plan", "--connections", "800000"]) == 0
    out = capsys.readouterr().out
    assert "Capacity plan for 800,000 concurrent connections (API defaults)" in out
    assert "replicas                 10" in out
    assert "max_connections 500" in out
    # What each component requests, per pod and in total.
    assert "proxy                    requests 3 CPU / 1669Mi, limits 4 CPU / 2503Mi per pod " \
        "(derived); x 10 = 30 CPU / 16.3 GiB requested" in out
    assert "pgbouncer                requests 500m CPU /" in out
    assert "redis                    requests 500m CPU / 1344Mi" in out
    assert cli(["plan", "--connections", "50000000", "--strict"]) == 1  # beyond maxReplicas
    capsys.readouterr()
    assert cli(["plan", "--connections", "200000", "-o", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["replicas"] == 3
    assert data["connections"] == 200_000


def test_plan_command_reads_a_cluster_file(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    docs = list(yaml.safe_load_all((EXAMPLES / "gpuproxycluster-production-100k.yaml")
                                   .read_text()))
    assert cli(["plan", "-f", str(EXAMPLES / "gpuproxycluster-production-100k.yaml")]) == 0
    out = capsys.readouterr().out
    cluster = next(d for d in docs if d and d.get("kind") == "GpuProxyCluster")
    assert f"{cluster['metadata']['namespace']}/{cluster['metadata']['name']}" in out

    bad = tmp_path / "bad.yaml"
    cluster["spec"]["autoscaling"]["minReplicas"] = 50
    bad.write_text(yaml.safe_dump(cluster))
    assert cli(["plan", "-f", str(bad)]) == 2
    assert "minReplicas must be less than or equal to maxReplicas" in capsys.readouterr().err
    assert cli(["plan", "-f", str(tmp_path / "missing.yaml")]) == 2


@pytest.mark.parametrize("value", ["0", "-5", "1.5", "many"])
def test_plan_connections_must_be_a_positive_integer(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # 0 used to fall back silently to targetConnections (1,000,000).
    with pytest.raises(SystemExit) as exit_info:
        cli(["plan", "--connections", value])
    assert exit_info.value.code == 2
    assert "argument --connections:" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_plan_strict_passes_on_every_example(path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    code = cli(["plan", "--strict", "-f", str(path)])
    assert code == 0, capsys.readouterr().out


def test_autoscaling_off_plans_for_its_replicas_by_default(
    capsys: pytest.CaptureFixture[str]
) -> None:
    # targetConnections is an autoscaling setting: with autoscaling off nothing uses it.
    assert cli(["plan", "-o", "json", "-f", str(EXAMPLES / "gpuproxycluster-minimal.yaml")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["connections"] == 2 * 20_000


def test_plan_strict_passes_on_the_api_defaults(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """The defaults pass their own checks: without -f (autoscaling on) and for a cluster that
    sets only what has no default."""
    assert cli(["plan", "--strict"]) == 0, capsys.readouterr().out
    minimal = tmp_path / "defaults.yaml"
    minimal.write_text(yaml.safe_dump({
        "apiVersion": "gpuproxy.aiserve.farm/v1alpha1", "kind": "GpuProxyCluster",
        "metadata": {"name": "defaults"},
        "spec": {"proxy": {"backends": [{"name": "gpu", "url": "http://gpu:8000"}]},
                 "database": {"host": "pg", "credentialsSecret": "db"}},
    }))
    assert cli(["plan", "--strict", "-f", str(minimal)]) == 0, capsys.readouterr().out


def test_memory_per_connection_is_the_benchmarks_figure() -> None:
    bench = (ROOT / "bench" / "README.md").read_text(encoding="utf-8")
    assert f"**{USER_KIB_PER_CONNECTION:g} KiB per idle connection**" in bench
    assert MEMORY_SOURCE.startswith(f"{USER_KIB_PER_CONNECTION:g} KiB user space")
    assert f"{KERNEL_KIB_PER_SOCKET:g} KiB kernel" in MEMORY_SOURCE
