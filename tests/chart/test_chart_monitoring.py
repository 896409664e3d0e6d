"""The chart's monitoring: the operator's ServiceMonitor and PrometheusRule (on when the cluster
serves prometheus-operator, each alert evaluated by promtool) and the Grafana dashboards (sidecar
ConfigMaps; every query parses and names only metrics and labels the proxy or operator export)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from tests.chart.helm import CHART, NAMESPACE, by_kind, one, render, render_result
from tests.chart.schemas import SERVICEMONITOR_CRD, crd_validator, schema_errors
from tests.operator.exported_metrics import Exported, operator_metrics, proxy_metrics
from tests.operator.promtool import (
    SCRAPE_LABELS,
    Case,
    check_rules,
    covered,
    expected_alert,
    pod_monitor_target,
    rules_by_name,
    run_rule_tests,
    series,
    service_monitor_target,
)
from tests.tools import REPO_ROOT

PROMETHEUSRULE_CRD = (
    REPO_ROOT / "tests" / "operator" / "schemas" / "monitoring.coreos.com_prometheusrules.yaml"
)
MONITORING = {"PrometheusRule", "ServiceMonitor"}
RULES_ON = ("metrics.prometheusRule.enabled=true",)
DASHBOARDS = {"proxy": CHART / "dashboards" / "gpuproxy-proxy.json",
              "operator": CHART / "dashboards" / "gpuproxy-operator.json"}


def _monitoring_kinds(sets: tuple[str, ...], *extra: str) -> set[str]:
    return {m["kind"] for m in render((), sets, *extra)} & MONITORING


@pytest.mark.parametrize(("sets", "extra", "kinds"), [
    ((), (), set()),  # auto, and `helm template` knows no prometheus-operator
    ((), ("--api-versions", "monitoring.coreos.com/v1/PrometheusRule",
          "--api-versions", "monitoring.coreos.com/v1/ServiceMonitor"), MONITORING),
    ((), ("--api-versions", "monitoring.coreos.com/v1"), MONITORING),
    (("metrics.prometheusRule.enabled=true", "metrics.serviceMonitor.enabled=true"), (),
     MONITORING),
    (("metrics.prometheusRule.enabled=false",), ("--api-versions", "monitoring.coreos.com/v1"),
     {"ServiceMonitor"}),
    (("metrics.enabled=false", "metrics.prometheusRule.enabled=true",
      "metrics.serviceMonitor.enabled=true"), (), set()),
])
def test_operator_monitoring_follows_values_and_the_clusters_apis(
    sets: tuple[str, ...], extra: tuple[str, ...], kinds: set[str]
) -> None:
    assert _monitoring_kinds(sets, *extra) == kinds


@pytest.mark.parametrize(("sets", "message"), [
    (("metrics.prometheusRule.enabled=maybe",), "/metrics/prometheusRule/enabled"),
    (("dashboards.labelKey=not a label",), "/dashboards/labelKey"),
    (("dashboards.namespace=Not_A_Namespace",), "/dashboards/namespace"),
])
def test_values_schema_rejects_bad_monitoring_values(sets: tuple[str, ...], message: str) -> None:
    result = render_result((), sets)
    assert result.returncode != 0
    assert message in result.stderr


def test_monitoring_objects_are_valid() -> None:
    manifests = render((), (*RULES_ON, "metrics.serviceMonitor.enabled=true",
                            "metrics.prometheusRule.labels.release=kube-prometheus-stack"))
    rule = one(manifests, "PrometheusRule")
    assert schema_errors(crd_validator(PROMETHEUSRULE_CRD, "v1"), rule) == []
    assert rule["metadata"]["namespace"] == NAMESPACE
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    monitor = one(manifests, "ServiceMonitor")
    assert schema_errors(crd_validator(SERVICEMONITOR_CRD, "v1"), monitor) == []
    for configmap in by_kind(manifests, "ConfigMap"):
        kubernetes_validate.validate(configmap, kubernetes_validate.utils.latest_version(),
                                     strict=True)


# --- The operator's alerts, evaluated ------------------------------------------------------------


def _operator_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = one(render((), RULES_ON), "PrometheusRule")["spec"]["groups"]
    return groups


RULES = rules_by_name(_operator_groups())
OPERATOR = service_monitor_target(NAMESPACE, "gp-gpuproxy-operator-metrics",
                                  "gp-gpuproxy-operator-7c9d5b6f48-h2k8w", "operator", "metrics")
OPERATOR_PM = pod_monitor_target(NAMESPACE, "gp-gpuproxy-operator",
                                 "gp-gpuproxy-operator-7c9d5b6f48-h2k8w", "operator", "metrics")
ELSEWHERE = service_monitor_target("other-system", "other-operator-metrics",
                                   "other-operator-5d6f7-abcde", "operator", "metrics")


def _able(target: dict[str, str], namespace: str, name: str, values: str) -> tuple[str, str]:
    labels = {**target, "cluster_namespace": namespace, "cluster": name}
    return series("gpuproxy_operator_autoscaler_able", labels), values


def _errors(target: dict[str, str], values: str) -> tuple[str, str]:
    labels = {**target, "error": "KubeError"}
    return series("gpuproxy_operator_reconcile_errors_total", labels), values


def fired(alert: str, value: str, **labels: str) -> dict[str, Any]:
    return expected_alert(RULES[alert], value, labels)


OPERATOR_CASES = [
    Case("operator metrics: none from the release namespace, some from elsewhere",
         [(series("gpuproxy_operator_managed_clusters", ELSEWHERE), "2x30")],
         [("9m", "GpuProxyOperatorMetricsAbsent", []),  # pending: `for: 10m`
          ("11m", "GpuProxyOperatorMetricsAbsent",
           [fired("GpuProxyOperatorMetricsAbsent", "1", namespace=NAMESPACE)])]),
    Case("operator metrics: present (through a PodMonitor's labels)",
         [(series("gpuproxy_operator_managed_clusters", OPERATOR_PM), "2x30")],
         [("20m", "GpuProxyOperatorMetricsAbsent", [])]),
    Case("reconcile errors: one a minute, for 40 minutes",
         [_errors(OPERATOR, "0+1x40")],
         [("10m", "GpuProxyOperatorReconcileErrors", []),  # pending: `for: 15m`
          ("25m", "GpuProxyOperatorReconcileErrors",
           [fired("GpuProxyOperatorReconcileErrors", "16.67m", namespace=NAMESPACE)])]),
    Case("reconcile errors: one burst, then none; and steady errors of another operator",
         [_errors(OPERATOR, "0x10 3x30"), _errors(ELSEWHERE, "0+1x40")],
         [("14m", "GpuProxyOperatorReconcileErrors", []),
          ("30m", "GpuProxyOperatorReconcileErrors", [])]),
    Case("autoscaler: one cluster stuck for 30 minutes, one fine, one stuck only 5 minutes",
         [_able(OPERATOR, "team-a", "prod", "0x30"), _able(OPERATOR, "team-a", "ok", "1x30"),
          _able(OPERATOR, "team-b", "blip", "0x5 1x25")],
         [("10m", "GpuProxyAutoscalerCannotScale", []),  # pending: `for: 15m`
          ("20m", "GpuProxyAutoscalerCannotScale",
           [fired("GpuProxyAutoscalerCannotScale", "0", cluster_namespace="team-a",
                  cluster="prod", namespace="team-a")])]),
    Case("autoscaler: every cluster able; another operator's stuck cluster",
         [_able(OPERATOR, "team-a", "prod", "1x30"), _able(ELSEWHERE, "team-c", "x", "0x30")],
         [("20m", "GpuProxyAutoscalerCannotScale", [])]),
]


def test_operator_rules_pass_promtool_check(tmp_path: Path) -> None:
    result = check_rules(tmp_path, _operator_groups())
    assert result.returncode == 0, result.output
    assert "SUCCESS: 3 rules found" in result.output


def test_operator_alerts_fire_and_stay_quiet_as_expected(tmp_path: Path) -> None:
    firing, quiet = covered(OPERATOR_CASES)
    assert firing == set(RULES) == quiet
    result = run_rule_tests(tmp_path, _operator_groups(), OPERATOR_CASES)
    assert result.returncode == 0, result.output


def test_operator_rules_follow_the_release_namespace() -> None:
    rule = one(render((), RULES_ON, "--namespace", "ops"), "PrometheusRule")
    exprs = [r["expr"] for r in rule["spec"]["groups"][0]["rules"]]
    assert all('namespace="ops"' in expr for expr in exprs)


def test_operator_rules_name_only_exported_operator_metrics() -> None:
    names = {n for r in RULES.values() for n in re.findall(r"\bgpuproxy_\w+", r["expr"])}
    assert names
    assert names <= set(operator_metrics())


# --- Dashboards ----------------------------------------------------------------------------------


def _dashboard(name: str) -> dict[str, Any]:
    board: dict[str, Any] = json.loads(DASHBOARDS[name].read_text(encoding="utf-8"))
    return board


def test_dashboards_ship_as_sidecar_configmaps() -> None:
    configmaps = {m["metadata"]["name"]: m for m in by_kind(render(), "ConfigMap")}
    for name, path in DASHBOARDS.items():
        configmap = configmaps[f"gp-gpuproxy-operator-dashboard-{name}"]
        assert configmap["metadata"]["namespace"] == NAMESPACE
        assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
        [(key, text)] = configmap["data"].items()
        assert key == path.name
        assert json.loads(text) == _dashboard(name)


def test_dashboard_configmaps_follow_their_values() -> None:
    manifests = render((), ("dashboards.namespace=monitoring", "dashboards.labelKey=dashboards",
                            "dashboards.labelValue=gpuproxy",
                            "dashboards.annotations.grafana_folder=GPU"))
    boards = [m for m in by_kind(manifests, "ConfigMap") if "-dashboard-" in m["metadata"]["name"]]
    assert len(boards) == 2
    for board in boards:
        meta = board["metadata"]
        assert meta["namespace"] == "monitoring"
        assert meta["labels"]["dashboards"] == "gpuproxy"
        assert "grafana_dashboard" not in meta["labels"]
        assert meta["annotations"] == {"grafana_folder": "GPU"}
    numeric = one([m for m in by_kind(render((), ("dashboards.labelValue=1",)), "ConfigMap")
                   if m["metadata"]["name"].endswith("-dashboard-proxy")], "ConfigMap")
    assert numeric["metadata"]["labels"]["grafana_dashboard"] == "1"
    off = render((), ("dashboards.enabled=false",))
    assert not [m for m in off if "-dashboard-" in m["metadata"]["name"]]


def _panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in board["panels"] if p["type"] != "row"]


def _queries(board: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(where, PromQL, legend) of every panel target and query variable."""
    out = [(f"panel {p['title']!r}", t["expr"], t.get("legendFormat", ""))
           for p in _panels(board) for t in p["targets"]]
    out += [(f"variable {v['name']}", v["query"]["query"], "")
            for v in board["templating"]["list"] if v["type"] == "query"]
    return out


@pytest.mark.parametrize("name", DASHBOARDS)
def test_dashboards_are_grafana_dashboards(name: str) -> None:
    board = _dashboard(name)
    assert board["uid"] == f"gpuproxy-{name}"
    assert board["title"]
    assert board["schemaVersion"] >= 36
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "namespace" in variables
    if name == "proxy":
        # The cluster is read off the proxy pods' names, as the alert rules select them.
        extract = re.compile(variables["cluster"]["regex"].strip("/"))
        pods = {"mini-proxy-6d4cf56db6-x7k2p": "mini", "mini-proxy-proxy-5b7c9d8f4-q2w3e":
                "mini-proxy", "a-proxy-b-proxy-7f8-abcde": "a-proxy-b"}
        assert {pod: m.group(1) for pod in pods if (m := extract.match(pod))} == pods
    for panel in _panels(board):
        assert panel["title"], panel["id"]
        assert panel["description"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        grid = panel["gridPos"]
        assert 0 < grid["w"] <= 24 - grid["x"], panel["title"]
        assert grid["h"] > 0, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))
        for target in panel["targets"]:
            assert "$namespace" in target["expr"], panel["title"]
            if name == "proxy":
                assert "$cluster" in target["expr"], panel["title"]


def _exported(name: str) -> Exported:
    return proxy_metrics() if name == "proxy" else operator_metrics()


@pytest.mark.parametrize("name", DASHBOARDS)
def test_dashboard_queries_name_only_exported_metrics_and_labels(name: str) -> None:
    exported = _exported(name)
    problems = []
    for where, expr, legend in _queries(_dashboard(name)):
        metrics = set(re.findall(r"\bgpuproxy_\w+", expr))
        if not metrics:
            problems.append(f"{where}: no gpuproxy metric in {expr}")
        problems += [f"{where}: {m} is not exported" for m in sorted(metrics - set(exported))]
        known = set(SCRAPE_LABELS).union(*(exported.get(m, frozenset()) for m in metrics))
        used = {label.strip() for group in re.findall(r"\b(?:by|without) \(([^)]*)\)", expr)
                for label in group.split(",")}
        used |= set(re.findall(r"\{\{(\w+)\}\}", legend))
        used |= set(re.findall(r"label_values\(.*, (\w+)\)", expr))
        problems += [f"{where}: label {label} is not on {sorted(metrics)}"
                     for label in sorted(used - known)]
    assert problems == []


@pytest.mark.parametrize("name", DASHBOARDS)
def test_dashboard_queries_parse(name: str, tmp_path: Path) -> None:
    """Each query, with Grafana's variables filled in, as a recording rule for promtool."""
    fill = {"$__rate_interval": "5m", "$namespace": "default", "$cluster": "mini"}
    rules = []
    for n, (_, expr, _) in enumerate(_queries(_dashboard(name))):
        if expr.startswith("label_values("):
            expr = expr.removeprefix("label_values(").rsplit(",", 1)[0]
        for variable, value in fill.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{n}", "expr": expr})
    result = check_rules(tmp_path, [{"name": f"dashboard_{name}", "rules": rules}])
    assert result.returncode == 0, result.output


@pytest.mark.parametrize(("name", "wanted"), [
    ("proxy", {"gpuproxy_connections_active", "gpuproxy_requests_total",
               "gpuproxy_request_duration_milliseconds_bucket", "gpuproxy_requests_in_flight",
               "gpuproxy_backend_healthy", "gpuproxy_ratelimit_rejections_total",
               "gpuproxy_db_connections_active", "gpuproxy_db_connections_max",
               "gpuproxy_usage_records_written_total", "gpuproxy_usage_records_dropped_total"}),
    ("operator", {"gpuproxy_operator_reconciles_total", "gpuproxy_operator_reconcile_errors_total",
                  "gpuproxy_operator_reconcile_duration_seconds_bucket",
                  "gpuproxy_operator_api_calls_total", "gpuproxy_operator_managed_clusters",
                  "gpuproxy_operator_autoscaler_steps_total",
                  "gpuproxy_operator_autoscaler_able"}),
])
def test_dashboards_cover_what_operations_watch(name: str, wanted: set[str]) -> None:
    used = {m for _, expr, _ in _queries(_dashboard(name))
            for m in re.findall(r"\bgpuproxy_\w+", expr)}
    assert wanted <= used
