"""Prometheus integration: the guide's alert rules (plus connection saturation) as a
PrometheusRule, and a ServiceMonitor on the proxy's metrics Service."""

from __future__ import annotations

from typing import Any

from gpuproxy_operator.api.cluster import GpuProxyCluster
from gpuproxy_operator.builders.common import Manifest, metadata, selector, with_spec_hash
from gpuproxy_operator.builders.proxy_services import (
    METRICS_LABEL,
    METRICS_PORT_NAME,
    METRICS_SUFFIX,
)
from gpuproxy_operator.naming import child_name

MONITORING_API = "monitoring.coreos.com/v1"


def _fmt(number: float) -> str:
    """Thresholds print without float noise: 0.05 not 0.05000000000000000277."""
    return repr(float(number)) if not float(number).is_integer() else str(int(number))


def alert_rules(cluster: GpuProxyCluster) -> list[dict[str, Any]]:
    spec = cluster.spec.monitoring.prometheus_rule
    ns = cluster.metadata.namespace
    job = child_name(cluster.metadata.name, "proxy", METRICS_SUFFIX)
    sel = f'namespace="{ns}", job="{job}"'
    target = f"{ns}/{cluster.metadata.name}"
    cpr = cluster.spec.proxy.connections_per_replica

    def rule(
        name: str, expr: str, for_: str, severity: str, summary: str, description: str
    ) -> dict[str, Any]:
        return {
            "alert": name,
            "expr": expr,
            "for": for_,
            "labels": {"severity": severity, "gpuproxy_cluster": cluster.metadata.name},
            "annotations": {"summary": summary, "description": description},
        }

    return [
        rule(
            "HighErrorRate",
            f"sum(rate(gpuproxy_requests_failed_total{{{sel}}}[5m])) / "
            f"sum(rate(gpuproxy_requests_total{{{sel}}}[5m])) > {_fmt(spec.error_rate_threshold)}",
            "5m", "critical",
            f"High error rate on GpuProxyCluster {target}",
            "More than {{ $value | humanizePercentage }} of requests failed with a 5xx over "
            "5 minutes. Check backend health (/stats on the admin port, "
            "gpuproxy_backend_healthy), upstream timeouts and the proxy logs.",
        ),
        rule(
            "DatabasePoolExhaustion",
            f"sum(gpuproxy_db_connections_active{{{sel}}}) / "
            f"sum(gpuproxy_db_connections_max{{{sel}}}) > "
            f"{_fmt(spec.db_pool_utilization_threshold)}",
            "2m", "warning",
            f"Database connection pool near exhaustion on GpuProxyCluster {target}",
            "The proxies' database pools are {{ $value | humanizePercentage }} used. "
            "Check slow queries in PostgreSQL and PgBouncer's SHOW POOLS; raise "
            "spec.pgbouncer.defaultPoolSize or reduce usage-record batch pressure.",
        ),
        rule(
            "HighLatency",
            "histogram_quantile(0.99, sum by (le) "
            f"(rate(gpuproxy_request_duration_milliseconds_bucket{{{sel}}}[5m]))) > "
            f"{spec.p99_latency_ms_threshold}",
            "5m", "warning",
            f"P99 latency above {spec.p99_latency_ms_threshold} ms on GpuProxyCluster {target}",
            "The 99th percentile request duration is {{ $value | humanize }} ms. Check GPU "
            "backend saturation and the least_response_time strategy; add backends if they "
            "are all busy.",
        ),
        rule(
            "ConnectionSaturation",
            f"sum by (pod) (gpuproxy_connections_active{{{sel}}}) / {cpr} > "
            f"{_fmt(spec.connection_saturation_threshold)}",
            "5m", "warning",
            f"Proxy pod near its connection capacity on GpuProxyCluster {target}",
            "Pod {{ $labels.pod }} holds {{ $value | humanizePercentage }} of "
            f"connectionsPerReplica ({cpr}). Check that autoscaling is enabled and not at "
            "maxReplicas, and that the Service spreads connections evenly.",
        ),
    ]


def _metadata(cluster: GpuProxyCluster, extra_labels: dict[str, str]) -> dict[str, Any]:
    """Both monitoring objects share a name; the user's labels let Prometheus select them."""
    return metadata(
        cluster,
        child_name(cluster.metadata.name, "monitoring"),
        "monitoring",
        cluster.spec.proxy.image,
        extra_labels=dict(extra_labels),
    )


def build_prometheus_rule(cluster: GpuProxyCluster) -> Manifest | None:
    spec = cluster.spec.monitoring.prometheus_rule
    if not spec.enabled:
        return None
    return with_spec_hash({
        "apiVersion": MONITORING_API,
        "kind": "PrometheusRule",
        "metadata": _metadata(cluster, spec.labels),
        "spec": {"groups": [{"name": "gpuproxy_alerts", "rules": alert_rules(cluster)}]},
    })


def build_service_monitor(cluster: GpuProxyCluster) -> Manifest | None:
    spec = cluster.spec.monitoring.service_monitor
    if not spec.enabled:
        return None
    return with_spec_hash({
        "apiVersion": MONITORING_API,
        "kind": "ServiceMonitor",
        "metadata": _metadata(cluster, spec.labels),
        "spec": {
            "selector": {"matchLabels": {**selector(cluster, "proxy"), METRICS_LABEL: "true"}},
            "namespaceSelector": {"matchNames": [cluster.metadata.namespace]},
            "endpoints": [
                {"port": METRICS_PORT_NAME, "path": "/metrics", "interval": spec.interval}
            ],
        },
    })
