"""Defaults follow the deployment guide; bad input gets errors naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from gpuproxy_operator.api.cluster import InvalidSpecError, parse_cluster
from gpuproxy_operator.sysctls import GUIDE_SYSCTLS


def body(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "apiVersion": "gpuproxy.aiserve.farm/v1alpha1",
        "kind": "GpuProxyCluster",
        "metadata": {"name": "t", "namespace": "ns"},
        "spec": {
            "proxy": {"backends": [{"name": "a", "url": "http://a:8000"}]},
            "database": {"host": "pg", "credentialsSecret": "db"},
        },
    }
    base["spec"].update(spec)
    return base


def test_defaults_are_the_guides_numbers() -> None:
    spec = parse_cluster(body()).spec
    assert spec.proxy.connections_per_replica == 100_000
    rl = spec.proxy.rate_limits
    assert (rl.per_ip, rl.per_user, rl.per_api_key, rl.window_seconds) == (1000, 10000, 100000, 60)
    assert spec.autoscaling.target_connections == 1_000_000
    pgb = spec.pgbouncer
    # Two pods; pool sizes: the guide's 500 minus PostgreSQL's 3 reserved slots, shared by the
    # pods (190 + 50 reserve = 240 each, 2 x 240 = 480 <= 497).
    assert pgb.replicas == 2
    assert (pgb.pool_mode, pgb.max_client_conn, pgb.default_pool_size) == (
        "transaction", 100_000, 190,
    )
    assert (pgb.reserve_pool_size, pgb.reserve_pool_timeout_seconds) == (50, 5)
    assert (pgb.server_lifetime_seconds, pgb.server_idle_timeout_seconds) == (1800, 300)
    assert (pgb.max_db_connections, pgb.max_user_connections) == (240, 240)
    assert pgb.default_pool_size + pgb.reserve_pool_size <= pgb.max_db_connections
    assert pgb.replicas * pgb.max_db_connections <= 500 - 3
    redis = spec.redis
    # Rate-limit counters only (the guide's 16gb is sized for a dedicated host).
    assert (redis.maxmemory, redis.maxmemory_policy, redis.tcp_backlog) == (
        "1gb", "allkeys-lru", 65535,
    )
    # Unset: the builders derive them (no figures stored in every CR).
    assert spec.proxy.resources is pgb.resources is redis.resources is None
    shutdown = spec.proxy.shutdown
    assert (shutdown.drain_delay_seconds, shutdown.idle_close_seconds) == (10, 10)
    assert spec.proxy.upstream.max_request_seconds == 600
    assert spec.proxy.termination_grace_period_seconds is None
    assert (redis.io_threads, redis.persistence) == (4, False)
    # Node tuning is only asked for; the sysctls are the chart's (nothing stored in the CR).
    assert spec.node_tuning.enabled
    assert spec.node_tuning.sysctls is None
    assert GUIDE_SYSCTLS["net.ipv4.tcp_rmem"] == "4096 87380 10485760"
    assert len(GUIDE_SYSCTLS) == 21
    rule = spec.monitoring.prometheus_rule
    assert (rule.error_rate_threshold, rule.p99_latency_ms_threshold) == (0.05, 5000)
    assert rule.db_pool_utilization_threshold == 0.9
    behavior = spec.autoscaling.behavior
    assert behavior.scale_down.stabilization_window_seconds == 300
    assert behavior.scale_up.stabilization_window_seconds == 0


def test_quantities_accept_ints_and_strings() -> None:
    spec = parse_cluster(
        body(pgbouncer={"resources": {"requests": {"cpu": 2, "memory": "1Gi"}}})
    ).spec
    assert spec.pgbouncer.resources.requests == {"cpu": "2", "memory": "1Gi"}


@pytest.mark.parametrize(
    ("spec", "path", "reason"),
    [
        ({"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}, "spec.autoscaling",
         "minReplicas must be less than or equal to maxReplicas"),
        ({"redis": {"mode": "external"}}, "spec.redis", "url is required"),
        ({"proxy": {"backends": []}}, "spec.proxy", "at least one backend: backends or "
         "backendDiscovery"),
        ({"proxy": {"backends": [{"name": "Bad_Name", "url": "http://a"}]}},
         "spec.proxy.backends[0].name", "should match pattern"),
        ({"proxy": {"backends": [{"name": "a", "url": "ftp://a"}]}},
         "spec.proxy.backends[0].url", "must be an http:// or https:// URL"),
        ({"proxy": {"backends": [{"name": "a", "url": "http://a"}], "wrkers": 2}},
         "spec.proxy.wrkers", "Extra inputs are not permitted"),
    ],
)
def test_invalid_specs_name_the_field(spec: dict[str, Any], path: str, reason: str) -> None:
    with pytest.raises(InvalidSpecError) as info:
        parse_cluster(body(**spec))
    assert any(p == path and reason in r for p, r in info.value.problems), info.value.problems
    assert "GpuProxyCluster ns/t is invalid" in str(info.value)
