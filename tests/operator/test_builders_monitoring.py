"""PrometheusRule alert expressions and thresholds pinned to the guide, the ServiceMonitor's
target, and the NetworkPolicies that fence Redis and PgBouncer."""

from __future__ import annotations

from typing import Any

from tests.operator.clusters import (
    CREDENTIALS,
    by_key,
    cluster,
    lean_body,
    minimal_body,
    production_body,
)

from gpuproxy_operator.builders import BuildInputs, build_all
from gpuproxy_operator.builders.common import Manifest

SEL = 'namespace="default", pod=~"mini-proxy-[a-z0-9]+-[a-z0-9]+"'
GUIDE_ALERTS = {
    "HighErrorRate": (
        f"sum by (namespace) (rate(gpuproxy_requests_failed_total{{{SEL}}}[5m])) / "
        f"sum by (namespace) (rate(gpuproxy_requests_total{{{SEL}}}[5m])) > 0.05",
        "5m", "critical",
    ),
    "DatabasePoolExhaustion": (
        f"max by (namespace, pod) (gpuproxy_db_connections_active{{{SEL}}}) / "
        f"max by (namespace, pod) (gpuproxy_db_connections_max{{{SEL}}}) > 0.9",
        "2m", "warning",
    ),
    "HighLatency": (
        "histogram_quantile(0.99, sum by (namespace, le) "
        f"(rate(gpuproxy_request_duration_milliseconds_bucket{{{SEL}}}[5m]))) > 5000",
        "5m", "warning",
    ),
    "ConnectionSaturation": (
        f"max by (namespace, pod) (gpuproxy_connections_active{{{SEL}}}) / 100000 > 0.9",
        "5m", "warning",
    ),
    "GpuProxyTargetDown": (f"max by (namespace, pod) (up{{{SEL}}}) == 0", "5m", "warning"),
    "GpuProxyMetricsAbsent": (f"absent(gpuproxy_connections_active{{{SEL}}})", "10m", "critical"),
    # Metering that loses nothing (issue 14): the spool carrying an outage, then full.
    "UsageSpoolBacklog": (
        f"max by (namespace, pod) (gpuproxy_metering_spool_oldest_seconds{{{SEL}}}) > 600",
        "5m", "warning",
    ),
    "UsageSpoolFull": (
        "sum by (namespace, action) "
        f"(increase(gpuproxy_metering_spool_full_total{{{SEL}}}[5m])) > 0",
        "0m", "critical",
    ),
}


def _objects(body: dict[str, Any]) -> dict[tuple[str, str], Manifest]:
    return by_key(build_all(cluster(body), BuildInputs(database_credentials=CREDENTIALS)))


def _rules(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    name = body["metadata"]["name"]
    rule = _objects(body)[("PrometheusRule", f"{name}-monitoring")]
    [group] = rule["spec"]["groups"]
    return {r["alert"]: r for r in group["rules"]}


def test_default_alerts_are_the_guides() -> None:
    rules = _rules(minimal_body())
    assert {name: (r["expr"], r["for"], r["labels"]["severity"]) for name, r in rules.items()} == (
        GUIDE_ALERTS
    )
    for r in rules.values():
        assert r["annotations"]["summary"]
        assert len(r["annotations"]["description"]) > 40


def test_thresholds_and_labels_follow_the_spec() -> None:
    body = production_body()
    body["spec"]["proxy"]["connectionsPerReplica"] = 50000
    body["spec"]["monitoring"]["prometheusRule"].update(
        errorRateThreshold=0.01, p99LatencyMsThreshold=2000, dbPoolUtilizationThreshold=0.85,
        connectionSaturationThreshold=0.8,
    )
    rules = _rules(body)
    sel = 'namespace="aiserve-farm", pod=~"prod-proxy-[a-z0-9]+-[a-z0-9]+"'
    assert rules["HighErrorRate"]["expr"].endswith(") > 0.01")
    assert rules["HighLatency"]["expr"].endswith(") > 2000")
    assert rules["DatabasePoolExhaustion"]["expr"].endswith(") > 0.85")
    assert rules["ConnectionSaturation"]["expr"] == (
        f"max by (namespace, pod) (gpuproxy_connections_active{{{sel}}}) / 50000 > 0.8"
    )
    meta = _objects(body)[("PrometheusRule", "prod-monitoring")]["metadata"]
    assert meta["labels"]["release"] == "kube-prometheus-stack"


def test_service_monitor_scrapes_only_the_metrics_service() -> None:
    objs = _objects(production_body())
    sm = objs[("ServiceMonitor", "prod-monitoring")]
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    [endpoint] = sm["spec"]["endpoints"]
    assert endpoint == {"port": "admin", "path": "/metrics", "interval": "30s"}
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["aiserve-farm"]}
    wanted = sm["spec"]["selector"]["matchLabels"]
    matched = [
        name for (kind, name), m in objs.items()
        if kind == "Service" and wanted.items() <= m["metadata"]["labels"].items()
    ]
    assert matched == ["prod-proxy-metrics"]
    port_names = [p["name"] for p in objs[("Service", "prod-proxy-metrics")]["spec"]["ports"]]
    assert endpoint["port"] in port_names
    lean = lean_body()  # rules off, serviceMonitor unset: it follows them
    assert ("ServiceMonitor", "lean-monitoring") not in _objects(lean)


def test_network_policies_admit_only_the_proxy() -> None:
    objs = _objects(production_body())
    proxy_pods = {"app.kubernetes.io/name": "gpuproxy", "app.kubernetes.io/instance": "prod",
                  "app.kubernetes.io/component": "proxy"}
    redis = objs[("NetworkPolicy", "prod-redis")]["spec"]
    assert redis["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "redis"
    assert redis["ingress"] == [{"from": [{"podSelector": {"matchLabels": proxy_pods}}],
                                 "ports": [{"protocol": "TCP", "port": 6379}]}]
    assert redis["policyTypes"] == ["Ingress", "Egress"]
    assert redis["egress"] == []
    pgb = objs[("NetworkPolicy", "prod-pgbouncer")]["spec"]
    assert pgb["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "pgbouncer"
    assert pgb["ingress"] == [{"from": [{"podSelector": {"matchLabels": proxy_pods}}],
                               "ports": [{"protocol": "TCP", "port": 6432}]}]
    assert pgb["policyTypes"] == ["Ingress", "Egress"]
    assert pgb["egress"] == [
        {"ports": [{"protocol": "TCP", "port": 5433}]},
        {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
    ]
