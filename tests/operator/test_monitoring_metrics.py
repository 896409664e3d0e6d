"""The operator's autoscaler metrics: what one step records, that a stopped loop leaves no gauge
for the alert to wait on, and label names that survive a scrape unchanged."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gpuproxy_operator.operator_metrics import OperatorMetrics


def _samples(metrics: OperatorMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            if family.name.startswith("gpuproxy_operator_autoscaler")
            for s in family.samples if not s.name.endswith("_created")}


def _key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return f"gpuproxy_operator_autoscaler_{name}", tuple(sorted(labels.items()))


def test_a_step_records_ability_reason_replicas_and_scaling() -> None:
    metrics = OperatorMetrics()
    metrics.autoscaler_step("team-a", "prod", True, "MetricsRecommendation", 5, scaled_by=2)
    metrics.autoscaler_step("team-a", "prod", False, "MetricsUnavailable", 5)
    metrics.autoscaler_step("team-a", "prod", True, "MetricsRecommendation", 4, scaled_by=-1)
    c = {"cluster_namespace": "team-a", "cluster": "prod"}
    assert _samples(metrics) == {
        _key("able", **c): 1.0,
        _key("desired_replicas", **c): 4.0,
        _key("steps_total", **c, reason="MetricsRecommendation"): 2.0,
        _key("steps_total", **c, reason="MetricsUnavailable"): 1.0,
        _key("scalings_total", **c, direction="up"): 1.0,
        _key("scalings_total", **c, direction="down"): 1.0,
    }


def test_unable_step_sets_the_gauge_the_alert_reads() -> None:
    metrics = OperatorMetrics()
    metrics.autoscaler_step("team-a", "prod", False, "ReplicasOwnedElsewhere")
    assert _samples(metrics)[_key("able", cluster_namespace="team-a", cluster="prod")] == 0.0
    assert _key("desired_replicas", cluster_namespace="team-a", cluster="prod") not in (
        _samples(metrics))


def test_a_stopped_loop_leaves_no_gauges() -> None:
    metrics = OperatorMetrics()
    metrics.autoscaler_step("team-a", "prod", False, "NoReadyPods", 3)
    metrics.autoscaler_step("team-a", "other", False, "NoReadyPods", 3)
    metrics.autoscaler_stopped("team-a", "prod")
    metrics.autoscaler_stopped("team-a", "never-started")  # no series: nothing to remove
    names = {(name, dict(labels)["cluster"]) for name, labels in _samples(metrics)}
    assert ("gpuproxy_operator_autoscaler_able", "prod") not in names
    assert ("gpuproxy_operator_autoscaler_desired_replicas", "prod") not in names
    assert ("gpuproxy_operator_autoscaler_able", "other") in names
    assert ("gpuproxy_operator_autoscaler_steps_total", "prod") in names


def test_cluster_labels_never_clash_with_the_scrapes_namespace() -> None:
    """A scrape sets `namespace` (the operator's) and, without honorLabels, renames a clashing
    series label to exported_namespace, which the rules would not find."""
    metrics = OperatorMetrics()
    metrics.autoscaler_step("team-a", "prod", True, "WithinTolerance", 2)
    labels = {name for _, pairs in _samples(metrics) for name, _ in pairs}
    assert "namespace" not in labels
    assert {"cluster_namespace", "cluster"} <= labels
