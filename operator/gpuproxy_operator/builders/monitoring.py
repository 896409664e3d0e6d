"""Prometheus integration: the guide's alert rules (plus saturation and missing-metrics alerts)
as a PrometheusRule, and a ServiceMonitor on the proxy's metrics Service."""

from __future__ import annotations

from typing import Any

from gpuproxy_operator.api.cluster import GpuProxyCluster
from gpuproxy_operator.builders.common import Manifest, metadata, selector, with_spec_hash
from gpuproxy_operator.builders.images import proxy_image
from gpuproxy_operator.builders.proxy_services import (
    METRICS_LABEL,
    METRICS_PORT_NAME,
    METRICS_SUFFIX,
)
from gpuproxy_operator.builders.spend_rules import spend_rules
from gpuproxy_operator.naming import child_name

MONITORING_API = "monitoring.coreos.com/v1"
# Deployment pods are `<deployment>-<pod-template-hash>-<suffix>`, both parts without dashes,
# so this matches this cluster's proxy pods and not those of a cluster named `<name>-proxy`.
POD_NAME_PATTERN = "{deployment}-[a-z0-9]+-[a-z0-9]+"


def _fmt(number: float) -> str:
    """Thresholds print without float noise: 0.05 not 0.05000000000000000277."""
    return repr(float(number)) if not float(number).is_integer() else str(int(number))


def series_selector(cluster: GpuProxyCluster) -> str:
    """PromQL matchers for this cluster's proxy series. `namespace` and `pod` are set by every
    way of scraping pods (our ServiceMonitor, a PodMonitor, the usual kubernetes-pods job);
    `job` is not (a ServiceMonitor names it after the Service, a PodMonitor after itself)."""
    deployment = child_name(cluster.metadata.name, "proxy")
    pods = POD_NAME_PATTERN.format(deployment=deployment)
    return f'namespace="{cluster.metadata.namespace}", pod=~"{pods}"'


def _expects_pods(cluster: GpuProxyCluster) -> bool:
    """Autoscaling keeps at least minReplicas (>= 1); otherwise spec.proxy.replicas may be 0."""
    return cluster.spec.autoscaling.enabled or cluster.spec.proxy.replicas > 0


def alert_rules(cluster: GpuProxyCluster) -> list[dict[str, Any]]:
    spec = cluster.spec.monitoring.prometheus_rule
    sel = series_selector(cluster)
    target = f"{cluster.metadata.namespace}/{cluster.metadata.name}"
    metrics_service = child_name(cluster.metadata.name, "proxy", METRICS_SUFFIX)
    cpr = cluster.spec.proxy.connections_per_replica

    def rule(
        name: str, expr: str, for_: str, severity: str, summary: str, description: str
    ) -> dict[str, Any]:
        return {
            "alert": name,
            "expr": expr,
            "for": for_,
            # namespace is also in every expression's result; set here too so that absent(),
            # whose result keeps only equality matchers, routes the same way.
            "labels": {"severity": severity, "gpuproxy_cluster": cluster.metadata.name,
                       "namespace": cluster.metadata.namespace},
            "annotations": {"summary": summary, "description": description},
        }

    rules = [
        rule(
            "HighErrorRate",
            f"sum by (namespace) (rate(gpuproxy_requests_failed_total{{{sel}}}[5m])) / "
            f"sum by (namespace) (rate(gpuproxy_requests_total{{{sel}}}[5m])) > "
            f"{_fmt(spec.error_rate_threshold)}",
            "5m", "critical",
            f"High error rate on GpuProxyCluster {target}",
            "{{ $value | humanizePercentage }} of requests failed with a 5xx over 5 minutes. "
            "Check backend health (/stats on the admin port, gpuproxy_backend_healthy), "
            "upstream timeouts and the proxy logs.",
        ),
        rule(
            # Per pod: each proxy pod has its own pool, and one full pool fails its requests.
            "DatabasePoolExhaustion",
            f"max by (namespace, pod) (gpuproxy_db_connections_active{{{sel}}}) / "
            f"max by (namespace, pod) (gpuproxy_db_connections_max{{{sel}}}) > "
            f"{_fmt(spec.db_pool_utilization_threshold)}",
            "2m", "warning",
            f"Database connection pool near exhaustion on GpuProxyCluster {target}",
            "Pod {{ $labels.pod }} uses {{ $value | humanizePercentage }} of its database "
            "pool. Check slow queries in PostgreSQL and PgBouncer's SHOW POOLS; raise "
            "spec.pgbouncer.defaultPoolSize or reduce usage-record batch pressure.",
        ),
        rule(
            "HighLatency",
            "histogram_quantile(0.99, sum by (namespace, le) "
            f"(rate(gpuproxy_request_duration_milliseconds_bucket{{{sel}}}[5m]))) > "
            f"{spec.p99_latency_ms_threshold}",
            "5m", "warning",
            f"P99 latency above {spec.p99_latency_ms_threshold} ms on GpuProxyCluster {target}",
            "The 99th percentile request duration is {{ $value | humanize }} ms. Check GPU "
            "backend saturation and the least_response_time strategy; add backends if they "
            "are all busy.",
        ),
        rule(
            # max, not sum: a pod scraped twice (two monitors) must not look twice as full.
            "ConnectionSaturation",
            f"max by (namespace, pod) (gpuproxy_connections_active{{{sel}}}) / {cpr} > "
            f"{_fmt(spec.connection_saturation_threshold)}",
            "5m", "warning",
            f"Proxy pod near its connection capacity on GpuProxyCluster {target}",
            "Pod {{ $labels.pod }} holds {{ $value | humanizePercentage }} of "
            f"connectionsPerReplica ({cpr}). Check that autoscaling is enabled and not at "
            "maxReplicas, and that the Service spreads connections evenly.",
        ),
        rule(
            "GpuProxyTargetDown",
            f"max by (namespace, pod) (up{{{sel}}}) == 0",
            "5m", "warning",
            f"Prometheus cannot scrape a proxy pod of GpuProxyCluster {target}",
            "Scrapes of pod {{ $labels.pod }} (admin port, /metrics) have failed for 5 "
            "minutes, so the other alerts cannot see it. Check the pod "
            f"(kubectl -n {cluster.metadata.namespace} describe pod {{{{ $labels.pod }}}}) "
            "and its admin port.",
        ),
        rule(
            # The spool carries a database outage; this says it has been carrying one.
            "UsageSpoolBacklog",
            f"max by (namespace, pod) (gpuproxy_metering_spool_oldest_seconds{{{sel}}}) > 600",
            "5m", "warning",
            f"Usage records waiting on disk for over 10 minutes on GpuProxyCluster {target}",
            "Pod {{ $labels.pod }} has usage records spooled for {{ $value | humanize }} s "
            "that PostgreSQL has not taken: check the database and PgBouncer. They are kept "
            "through crashes, but not if the pod is deleted, and when the spool is full "
            "spec.proxy.metering.onSpoolFull applies (reject: new requests get 503).",
        ),
        rule(
            "UsageSpoolFull",
            f"sum by (namespace, action) "
            f"(increase(gpuproxy_metering_spool_full_total{{{sel}}}[5m])) > 0",
            "0m", "critical",
            f"Usage spool full on GpuProxyCluster {target}",
            "{{ $value | humanize }} requests were refused (action rejected) or usage records "
            "lost their crash-safe copy (action dropped) in 5 minutes because the metering "
            "spool is full: PostgreSQL has not taken records for long. Restore the database; "
            "raise spec.proxy.metering.spoolSizeMib to carry longer outages.",
        ),
    ]
    if _expects_pods(cluster):
        rules.append(rule(
            "GpuProxyMetricsAbsent",
            f"absent(gpuproxy_connections_active{{{sel}}})",
            "10m", "critical",
            f"No proxy metrics from GpuProxyCluster {target}",
            "Prometheus has no gpuproxy_connections_active series from this cluster's proxy "
            "pods, so every other alert of it is blind: either no proxy pod is running "
            f"(kubectl -n {cluster.metadata.namespace} get pods -l "
            f"app.kubernetes.io/instance={cluster.metadata.name}) or nothing scrapes them "
            f"(spec.monitoring.serviceMonitor, Service {metrics_service} port "
            f"{METRICS_PORT_NAME}, and your Prometheus' serviceMonitorSelector).",
        ))
    rules.extend(spend_rules(cluster, sel, rule))
    return rules


def _metadata(cluster: GpuProxyCluster, extra_labels: dict[str, str]) -> dict[str, Any]:
    """Both monitoring objects share a name; the user's labels let Prometheus select them."""
    return metadata(
        cluster,
        child_name(cluster.metadata.name, "monitoring"),
        "monitoring",
        proxy_image(cluster),
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
