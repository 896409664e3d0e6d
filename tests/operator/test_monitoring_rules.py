"""Every alert of a cluster's PrometheusRule evaluated by Prometheus' own promtool over recorded
series with the labels a real scrape gives: each fires when it should and stays quiet when it
should not, for this cluster only, whether a ServiceMonitor or a PodMonitor scrapes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from tests.operator.clusters import cluster, minimal_body
from tests.operator.exported_metrics import proxy_metrics
from tests.operator.promtool import (
    Case,
    check_rules,
    covered,
    expected_alert,
    pod_monitor_target,
    promtool_binary,
    rules_by_name,
    run_rule_tests,
    series,
    service_monitor_target,
)
from tests.tools import MissingToolError

from gpuproxy_operator.builders.monitoring import build_prometheus_rule
from gpuproxy_proxy.observability.metrics import DURATION_BUCKETS_MS

NS = "default"
POD_A = "mini-proxy-6d4cf56db6-x7k2p"
POD_B = "mini-proxy-6d4cf56db6-m9q4z"
# Decoys that a loose selector would pick up: a cluster named `mini-proxy` in the same
# namespace (its pods start with `mini-proxy-proxy-`), and the same pod name elsewhere.
DECOY_CLUSTER = service_monitor_target(NS, "mini-proxy-proxy-metrics",
                                       "mini-proxy-proxy-5b7c9d8f4-q2w3e", "proxy", "admin")
DECOY_NAMESPACE = service_monitor_target("staging", "mini-proxy-metrics", POD_A, "proxy", "admin")


def sm(pod: str) -> dict[str, str]:
    return service_monitor_target(NS, "mini-proxy-metrics", pod, "proxy", "admin")


def pm(pod: str) -> dict[str, str]:
    return pod_monitor_target(NS, "mini-monitoring", pod, "proxy", "admin")


def _groups(body: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    manifest = build_prometheus_rule(cluster(body or minimal_body()))
    assert manifest is not None
    groups: list[dict[str, Any]] = manifest["spec"]["groups"]
    return groups


RULES = rules_by_name(_groups())


def fired(alert: str, value: str, **labels: str) -> dict[str, Any]:
    return expected_alert(RULES[alert], value, labels)


def requests(target: dict[str, str], ok_per_min: int, failed_per_min: int
             ) -> list[tuple[str, str]]:
    route = {**target, "route": "chat_completions"}
    return [
        (series("gpuproxy_requests_total", {**route, "code_class": "2xx"}),
         f"0+{ok_per_min}x30"),
        (series("gpuproxy_requests_total", {**route, "code_class": "5xx"}),
         f"0+{failed_per_min}x30"),
        (series("gpuproxy_requests_failed_total", route), f"0+{failed_per_min}x30"),
    ]


def durations(target: dict[str, str], slowest_bucket_ms: float) -> list[tuple[str, str]]:
    """Ten requests a minute, each taking between the bucket below `slowest_bucket_ms` and it."""
    route = {**target, "route": "chat_completions"}
    bounds = [*(repr(b) for b in DURATION_BUCKETS_MS), "+Inf"]
    return [
        (series("gpuproxy_request_duration_milliseconds_bucket", {**route, "le": le}),
         "0+10x30" if le == "+Inf" or float(le) >= slowest_bucket_ms else "0x30")
        for le in bounds
    ]


def gauge(name: str, target: dict[str, str], values: str) -> tuple[str, str]:
    return series(name, target), values


CASES = [
    Case("error rate: 10% of requests fail", requests(sm(POD_A), 90, 10), [
        ("3m", "HighErrorRate", []),  # pending: `for: 5m`
        ("10m", "HighErrorRate", [fired("HighErrorRate", "10%", namespace=NS)]),
    ]),
    Case("error rate: the same through a PodMonitor's labels", requests(pm(POD_A), 90, 10), [
        ("10m", "HighErrorRate", [fired("HighErrorRate", "10%", namespace=NS)]),
    ]),
    Case("error rate: 1% here, 100% in the decoys",
         [*requests(sm(POD_A), 99, 1), *requests(DECOY_CLUSTER, 0, 100),
          *requests(DECOY_NAMESPACE, 0, 100)],
         [("10m", "HighErrorRate", []), ("20m", "HighErrorRate", [])]),
    Case("latency: every request between 5 and 10 s", durations(sm(POD_A), 10000.0), [
        ("4m", "HighLatency", []),
        # p99 interpolates inside the (5000, 10000] bucket: 5000 + 0.99 * 5000.
        ("10m", "HighLatency", [fired("HighLatency", "9.95k", namespace=NS)]),
    ]),
    Case("latency: under a second here, a minute in the decoys",
         [*durations(sm(POD_A), 1000.0), *durations(DECOY_CLUSTER, 60000.0),
          *durations(DECOY_NAMESPACE, 60000.0)],
         [("10m", "HighLatency", [])]),
    Case("database pool: one pod at 19 of 20, the other at 2",
         [gauge("gpuproxy_db_connections_active", sm(POD_A), "19x30"),
          gauge("gpuproxy_db_connections_max", sm(POD_A), "20x30"),
          gauge("gpuproxy_db_connections_active", sm(POD_B), "2x30"),
          gauge("gpuproxy_db_connections_max", sm(POD_B), "20x30")],
         [("1m", "DatabasePoolExhaustion", []),  # pending: `for: 2m`
          ("5m", "DatabasePoolExhaustion",
           [fired("DatabasePoolExhaustion", "95%", namespace=NS, pod=POD_A)])]),
    Case("database pool: half used here, full in the decoys",
         [gauge("gpuproxy_db_connections_active", sm(POD_A), "10x30"),
          gauge("gpuproxy_db_connections_max", sm(POD_A), "20x30"),
          *(gauge(name, decoy, "20x30") for decoy in (DECOY_CLUSTER, DECOY_NAMESPACE)
            for name in ("gpuproxy_db_connections_active", "gpuproxy_db_connections_max"))],
         [("5m", "DatabasePoolExhaustion", [])]),
    Case("connections: one pod at 95k of 100k, the other at 30k",
         [gauge("gpuproxy_connections_active", sm(POD_A), "95000x30"),
          gauge("gpuproxy_connections_active", sm(POD_B), "30000x30")],
         [("4m", "ConnectionSaturation", []),
          ("10m", "ConnectionSaturation",
           [fired("ConnectionSaturation", "95%", namespace=NS, pod=POD_A)])]),
    Case("connections: 85k here, 99k in the decoys",
         [gauge("gpuproxy_connections_active", sm(POD_A), "85000x30"),
          gauge("gpuproxy_connections_active", DECOY_CLUSTER, "99000x30"),
          gauge("gpuproxy_connections_active", DECOY_NAMESPACE, "99000x30")],
         [("10m", "ConnectionSaturation", [])]),
    Case("scrape: one pod's target is down",
         [gauge("up", sm(POD_A), "0x30"), gauge("up", sm(POD_B), "1x30")],
         [("4m", "GpuProxyTargetDown", []),
          ("10m", "GpuProxyTargetDown",
           [fired("GpuProxyTargetDown", "0", namespace=NS, pod=POD_A)])]),
    Case("scrape: every target up, the decoys down",
         [gauge("up", sm(POD_A), "1x30"), gauge("up", DECOY_CLUSTER, "0x30"),
          gauge("up", DECOY_NAMESPACE, "0x30")],
         [("10m", "GpuProxyTargetDown", [])]),
    Case("spool: one pod's oldest record is 20 minutes old and growing",
         [gauge("gpuproxy_metering_spool_oldest_seconds", sm(POD_A), "1200+60x30"),
          gauge("gpuproxy_metering_spool_oldest_seconds", sm(POD_B), "3x30")],
         [("4m", "UsageSpoolBacklog", []),  # pending: `for: 5m`
          ("10m", "UsageSpoolBacklog",
           [fired("UsageSpoolBacklog", "1.8k", namespace=NS, pod=POD_A)])]),
    Case("spool: seconds old here, hours in the decoys",
         [gauge("gpuproxy_metering_spool_oldest_seconds", sm(POD_A), "2x30"),
          gauge("gpuproxy_metering_spool_oldest_seconds", DECOY_CLUSTER, "9000x30"),
          gauge("gpuproxy_metering_spool_oldest_seconds", DECOY_NAMESPACE, "9000x30")],
         [("10m", "UsageSpoolBacklog", [])]),
    Case("spool full: requests rejected from 10m",
         [(series("gpuproxy_metering_spool_full_total", {**sm(POD_A), "action": "rejected"}),
           "0x10 0+30x20")],
         [("5m", "UsageSpoolFull", []),
          ("15m", "UsageSpoolFull",
           [fired("UsageSpoolFull", "120", namespace=NS, action="rejected")])]),
    Case("spool full: never here, often in the decoys",
         [(series("gpuproxy_metering_spool_full_total", {**sm(POD_A), "action": "rejected"}),
           "0x30"),
          (series("gpuproxy_metering_spool_full_total", {**DECOY_CLUSTER, "action": "dropped"}),
           "0+30x30"),
          (series("gpuproxy_metering_spool_full_total",
                  {**DECOY_NAMESPACE, "action": "dropped"}), "0+30x30")],
         [("15m", "UsageSpoolFull", [])]),
    Case("absent: only the decoys report",
         [gauge("gpuproxy_connections_active", DECOY_CLUSTER, "5x30"),
          gauge("gpuproxy_connections_active", DECOY_NAMESPACE, "5x30")],
         [("9m", "GpuProxyMetricsAbsent", []),  # pending: `for: 10m`
          ("15m", "GpuProxyMetricsAbsent", [fired("GpuProxyMetricsAbsent", "1", namespace=NS)])]),
    Case("absent: the proxy reports, then stops at 5m",
         [gauge("gpuproxy_connections_active", sm(POD_A), "5x5 stale")],
         [("4m", "GpuProxyMetricsAbsent", []), ("12m", "GpuProxyMetricsAbsent", []),
          ("20m", "GpuProxyMetricsAbsent", [fired("GpuProxyMetricsAbsent", "1", namespace=NS)])]),
    Case("absent: the proxy keeps reporting",
         [gauge("gpuproxy_connections_active", pm(POD_A), "5x30")],
         [("20m", "GpuProxyMetricsAbsent", [])]),
]


def test_rules_pass_promtool_check(tmp_path: Path) -> None:
    result = check_rules(tmp_path, _groups())
    assert result.returncode == 0, result.output
    assert "SUCCESS: 8 rules found" in result.output


def test_every_alert_fires_and_stays_quiet_as_expected(tmp_path: Path) -> None:
    firing, quiet = covered(CASES)
    assert firing == set(RULES), "every alert needs a firing case"
    assert quiet == set(RULES), "every alert needs a not-firing case"
    result = run_rule_tests(tmp_path, _groups(), CASES)
    assert result.returncode == 0, result.output
    assert "SUCCESS" in result.output


def test_promtool_reports_an_alert_that_does_not_fire(tmp_path: Path) -> None:
    """The harness can fail: with the error-rate threshold above the recorded 10%, the same
    expectation is reported as missing."""
    body = minimal_body()
    body["spec"]["monitoring"] = {"prometheusRule": {"errorRateThreshold": 0.2}}
    result = run_rule_tests(tmp_path, _groups(body), CASES[:1])
    assert result.returncode != 0
    assert "HighErrorRate" in result.output


def test_rules_name_only_metrics_the_proxy_exports() -> None:
    """`up` is Prometheus' own series per target; every other name is the proxy's, as scraped
    from a running proxy."""
    names = {name for rule in RULES.values()
             for name in re.findall(r"\b(gpuproxy_\w+|up)\{", rule["expr"])}
    assert "up" in names
    assert names - {"up"} <= set(proxy_metrics())


def test_missing_promtool_fails_naming_make_bootstrap(monkeypatch: pytest.MonkeyPatch) -> None:
    """No silent skip: without promtool these tests fail and say how to get it."""
    monkeypatch.setattr("tests.tools.shutil.which", lambda *_, **__: None)
    with pytest.raises(MissingToolError, match="make bootstrap") as error:
        promtool_binary()
    assert "prometheus" in str(error.value)
