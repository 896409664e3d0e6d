"""With the defaults the alerts can fire: the ServiceMonitor follows the rules unless set, on the
operator's and on the API server's path; the selector is this cluster's pods and nothing else;
the missing-metrics alert exists only where pods are expected."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
from tests.api.apiserver import CelRules, admit
from tests.api.crd_schema import load_crd, openapi_schema
from tests.operator.clusters import cluster, minimal_body

from gpuproxy_operator.api.cluster import parse_cluster
from gpuproxy_operator.api.components import MonitoringSpec
from gpuproxy_operator.builders.monitoring import (
    alert_rules,
    build_prometheus_rule,
    build_service_monitor,
    series_selector,
)
from gpuproxy_operator.naming import child_name


def _kinds(monitoring: dict[str, Any] | None) -> set[str]:
    body = minimal_body()
    if monitoring is not None:
        body["spec"]["monitoring"] = monitoring
    c = cluster(body)
    built = [build_prometheus_rule(c), build_service_monitor(c)]
    return {m["kind"] for m in built if m is not None}


@pytest.mark.parametrize(("monitoring", "kinds"), [
    (None, {"PrometheusRule", "ServiceMonitor"}),
    ({"prometheusRule": {"enabled": False}}, set()),
    ({"serviceMonitor": {"interval": "10s"}}, {"PrometheusRule", "ServiceMonitor"}),
    ({"serviceMonitor": {"enabled": False}}, {"PrometheusRule"}),
    ({"prometheusRule": {"enabled": False}, "serviceMonitor": {"enabled": True}},
     {"ServiceMonitor"}),
])
def test_service_monitor_follows_the_rules_unless_set(
    monitoring: dict[str, Any] | None, kinds: set[str]
) -> None:
    assert _kinds(monitoring) == kinds


def test_the_api_servers_defaults_leave_the_choice_to_the_operator() -> None:
    """The CRD gives serviceMonitor.enabled no default (it could not depend on another field):
    a cluster stored without it still gets its ServiceMonitor."""
    admitted = admit(copy.deepcopy(minimal_body()), openapi_schema(load_crd()), CelRules())
    assert admitted.accepted, admitted.errors
    assert admitted.stored is not None
    stored = admitted.stored["spec"]["monitoring"]
    assert "enabled" not in stored["serviceMonitor"]
    assert stored["prometheusRule"]["enabled"] is True
    assert parse_cluster(admitted.stored).spec.monitoring.service_monitor.enabled is True


def test_resolved_value_is_a_plain_bool_for_every_reader() -> None:
    assert MonitoringSpec().service_monitor.enabled is True
    spec = MonitoringSpec.model_validate({"prometheus_rule": {"enabled": False}})
    assert spec.service_monitor.enabled is False


def test_selector_matches_this_clusters_proxy_pods_only() -> None:
    selector = series_selector(cluster(minimal_body()))
    assert selector.startswith('namespace="default", ')
    [pattern] = re.findall(r'pod=~"([^"]+)"', selector)
    ours = ["mini-proxy-6d4cf56db6-x7k2p", "mini-proxy-7b9f-abcde"]
    others = ["mini-proxy-proxy-5b7c9d8f4-q2w3e",  # a cluster named mini-proxy
              "mini-pgbouncer-6d4cf56db6-x7k2p", "mini-redis-0", "other-proxy-6d4cf56db6-x7k2p",
              "mini-proxy-6d4cf56db6", "xmini-proxy-6d4cf56db6-x7k2p"]
    # PromQL regex matchers are anchored at both ends, as fullmatch is.
    assert [p for p in ours if re.fullmatch(pattern, p)] == ours
    assert [p for p in others if re.fullmatch(pattern, p)] == []


def test_longest_cluster_name_gives_untruncated_pod_names() -> None:
    """Kubernetes cuts a generateName base beyond 58 characters, which would break the pod
    pattern; the 40-character name limit keeps `<name>-proxy-<hash>-` within it."""
    name = "a" * 40
    deployment = child_name(name, "proxy")
    longest_hash = 10  # pod-template-hash: a 32-bit FNV hash in the safe alphabet
    assert len(f"{deployment}-{'x' * longest_hash}-") <= 58
    body = minimal_body()
    body["metadata"]["name"] = name
    parse_cluster(body)  # the limit itself is the API's
    body["metadata"]["name"] = "a" * 41
    with pytest.raises(Exception, match="40"):
        parse_cluster(body)


@pytest.mark.parametrize(("proxy", "autoscaling", "expected"), [
    ({"replicas": 0}, {"enabled": False}, False),
    ({"replicas": 1}, {"enabled": False}, True),
    ({"replicas": 0}, {"enabled": True}, True),
])
def test_absent_alert_only_where_pods_are_expected(
    proxy: dict[str, Any], autoscaling: dict[str, Any], expected: bool
) -> None:
    body = minimal_body()
    body["spec"]["proxy"].update(proxy)
    body["spec"]["autoscaling"] = autoscaling
    names = {r["alert"] for r in alert_rules(cluster(body))}
    assert ("GpuProxyMetricsAbsent" in names) is expected
    assert "HighErrorRate" in names
