"""The examples users apply validate against our CRD and parse with the API models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from crd_schema import ROOT, load_crd, validator

from gpuproxy_operator.api.cluster import parse_cluster
from gpuproxy_operator.autoscaling.policy import per_replica_target, replica_bounds
from gpuproxy_operator.sizing import REDIS_BYTES_PER_KEY, REDIS_KEYS_PER_CLIENT, redis_bytes

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_there_are_a_minimal_and_a_production_example() -> None:
    names = {p.name for p in EXAMPLES}
    assert "gpuproxycluster-minimal.yaml" in names
    assert "gpuproxycluster-production-100k.yaml" in names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_documents_are_valid(path: Path) -> None:
    check = validator(load_crd())
    clusters = 0
    for doc in _docs(path):
        if doc["kind"] == "GpuProxyCluster":
            clusters += 1
            errors = [f"{list(e.absolute_path)}: {e.message}" for e in check.iter_errors(doc)]
            assert errors == []
            parse_cluster(doc)
        else:
            kubernetes_validate.validate(doc, "1.30.0", strict=True)
    assert clusters == 1


def test_production_example_matches_the_guide() -> None:
    path = ROOT / "examples" / "gpuproxycluster-production-100k.yaml"
    doc = next(d for d in _docs(path) if d["kind"] == "GpuProxyCluster")
    spec = parse_cluster(doc).spec
    cpr = spec.proxy.connections_per_replica
    assert cpr == 100_000
    # 1M connections fit at the autoscaler's target (100k x 80% per replica).
    _, upper = replica_bounds(spec.autoscaling, cpr)
    assert upper * per_replica_target(spec.autoscaling, cpr) >= 1_000_000
    assert spec.pgbouncer.pool_mode == "transaction"
    assert spec.pgbouncer.max_client_conn == 100_000
    # The guide's PostgreSQL has max_connections 500, 3 of them reserved for superusers; two
    # PgBouncer pods share that.
    assert spec.pgbouncer.replicas == 2
    assert spec.pgbouncer.replicas * spec.pgbouncer.max_db_connections <= 500 - 3
    # Rate-limit counters for 1M distinct clients fit maxmemory.
    assert redis_bytes(spec.redis.maxmemory) >= (
        1_000_000 * REDIS_KEYS_PER_CLIENT * REDIS_BYTES_PER_KEY)
    assert spec.redis.tcp_backlog == 65535
    assert spec.node_tuning.enabled


def test_schema_rejects_unknown_and_out_of_range_fields() -> None:
    path = ROOT / "examples" / "gpuproxycluster-minimal.yaml"
    doc = next(d for d in _docs(path) if d["kind"] == "GpuProxyCluster")
    doc["spec"]["proxy"]["workers"] = 0
    doc["spec"]["proxy"]["loadBalancing"] = {"strategy": "random"}
    messages = [e.message for e in validator(load_crd()).iter_errors(doc)]
    assert any("random" in m for m in messages)
    assert any("0 is less than the minimum" in m for m in messages)
