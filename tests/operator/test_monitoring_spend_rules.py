"""The spend alerts (spec.monitoring.spend) evaluated by promtool over recorded
gpuproxy_spend_usd_total series: the cluster's and a team's 24-hour spend fire over their
amounts and warn at warningPercent, for this cluster only; none exist without amounts."""

from __future__ import annotations

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
    promtool_binary,
    rules_by_name,
    run_rule_tests,
    series,
)
from tests.operator.test_monitoring_rules import DECOY_CLUSTER, NS, POD_A, POD_B, sm
from tests.tools import MissingToolError

from gpuproxy_operator.builders.monitoring import build_prometheus_rule

SPEND = {"dailyBudgetUsd": 100, "perTeam": {"ml": 50, "web": 1000}, "warningPercent": 80}


def _groups(spend: dict[str, Any] | None) -> list[dict[str, Any]]:
    body = minimal_body()
    if spend is not None:
        body["spec"]["monitoring"] = {"spend": spend}
    manifest = build_prometheus_rule(cluster(body))
    assert manifest is not None
    groups: list[dict[str, Any]] = manifest["spec"]["groups"]
    return groups


RULES = rules_by_name(_groups(SPEND))


def fired(alert: str, value: str, **labels: str) -> dict[str, Any]:
    return expected_alert(RULES[alert], value, labels)


def spend(target: dict[str, str], team: str | None, values: str) -> tuple[str, str]:
    labels = {**target, "model": "m"} | ({} if team is None else {"team": team})
    return series("gpuproxy_spend_usd_total", labels), values


# Team ml spends $5 a minute over two pods, the keys without a team $1: at 10m ml is at its
# $50 (not over), at 20m over it, and the cluster ($120) over its $100. The decoy cluster
# spends far more and must not count.
CASES = [
    Case("spend: a team, then the cluster, over budget",
         [spend(sm(POD_A), "ml", "0+3x30"), spend(sm(POD_B), "ml", "0+2x30"),
          spend(sm(POD_A), None, "0+1x30"), spend(DECOY_CLUSTER, "ml", "0+1000x30")],
         [("10m", "GpuProxyTeamDailySpendOverBudget", []),
          ("10m", "GpuProxyTeamDailySpendNearBudget",
           [fired("GpuProxyTeamDailySpendNearBudget", "50", namespace=NS, team="ml")]),
          ("10m", "GpuProxyDailySpendNearBudget", []),
          ("10m", "GpuProxyDailySpendOverBudget", []),
          ("20m", "GpuProxyTeamDailySpendOverBudget",
           [fired("GpuProxyTeamDailySpendOverBudget", "100", namespace=NS, team="ml")]),
          ("20m", "GpuProxyDailySpendNearBudget",
           [fired("GpuProxyDailySpendNearBudget", "120", namespace=NS)]),
          ("20m", "GpuProxyDailySpendOverBudget",
           [fired("GpuProxyDailySpendOverBudget", "120", namespace=NS)])]),
    Case("spend: a team under its amount while another team is over its own",
         [spend(sm(POD_A), "web", "0+5x30"), spend(sm(POD_A), "ml", "0x30")],
         [("20m", "GpuProxyTeamDailySpendOverBudget", []),
          ("20m", "GpuProxyTeamDailySpendNearBudget", [])]),
]


def test_spend_rules_pass_promtool(tmp_path: Path) -> None:
    try:
        promtool_binary()
    except MissingToolError as exc:
        pytest.fail(str(exc))
    result = check_rules(tmp_path, _groups(SPEND))
    assert result.returncode == 0, result.output
    spend_alerts = {name for name in RULES if "Spend" in name}
    assert spend_alerts == {"GpuProxyDailySpendOverBudget", "GpuProxyDailySpendNearBudget",
                            "GpuProxyTeamDailySpendOverBudget",
                            "GpuProxyTeamDailySpendNearBudget"}
    firing, quiet = covered(CASES)
    assert firing == quiet == spend_alerts
    result = run_rule_tests(tmp_path, _groups(SPEND), CASES)
    assert result.returncode == 0, result.output


def test_no_spend_alerts_without_amounts() -> None:
    names = set(rules_by_name(_groups(None)))
    assert not {n for n in names if "Spend" in n}
    only_total = set(rules_by_name(_groups({"dailyBudgetUsd": 10, "warningPercent": 0})))
    assert {n for n in only_total if "Spend" in n} == {"GpuProxyDailySpendOverBudget"}


def test_spend_rules_read_what_the_proxy_exports() -> None:
    """The proxy's scrape has the spend family with the team label the alerts group by."""
    exported = proxy_metrics()
    assert {"team", "model"} <= exported["gpuproxy_spend_usd_total"]
    assert {"team", "model", "kind"} <= exported["gpuproxy_tokens_total"]
