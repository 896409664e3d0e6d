"""The spend alerts of the PrometheusRule: the cluster's and each listed team's spend over the
last 24 hours (gpuproxy_spend_usd_total, USD from the proxy's price table) against the amounts
in spec.monitoring.spend, with a warning at warningPercent."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from gpuproxy_operator.api.cluster import GpuProxyCluster

Rule = Callable[[str, str, str, str, str, str], dict[str, Any]]


def _usd(amount: float) -> str:
    return f"{amount:.6f}".rstrip("0").rstrip(".")


def _team_expr(sel: str, teams: dict[str, float], factor: float) -> str:
    # One vector per team, joined with `or` (their team labels differ); json.dumps quotes
    # and escapes a team name as a PromQL string.
    return " or ".join(
        f"(sum by (namespace, team) (increase(gpuproxy_spend_usd_total{{{sel}, "
        f"team={json.dumps(team)}}}[1d])) > {_usd(amount * factor)})"
        for team, amount in sorted(teams.items()))


def spend_rules(cluster: GpuProxyCluster, sel: str, rule: Rule) -> list[dict[str, Any]]:
    spec = cluster.spec.monitoring.spend
    target = f"{cluster.metadata.namespace}/{cluster.metadata.name}"
    levels = [("OverBudget", 1.0, "critical", "over")]
    if spec.warning_percent:
        levels.append(("NearBudget", spec.warning_percent / 100, "warning",
                       f"at {spec.warning_percent}% of"))
    # increase() over a day is a rolling 24 hours (the proxy's own budgets reset at UTC
    # midnight); it counts restarts of the per-worker counters correctly.
    total = f"sum by (namespace) (increase(gpuproxy_spend_usd_total{{{sel}}}[1d]))"
    rules = []
    for suffix, factor, severity, words in levels:
        if spec.daily_budget_usd is not None:
            budget = spec.daily_budget_usd
            rules.append(rule(
                f"GpuProxyDailySpend{suffix}", f"{total} > {_usd(budget * factor)}", "0m",
                severity,
                f"Spend {words} the daily budget (${_usd(budget)}) on GpuProxyCluster {target}",
                "The cluster's requests cost ${{ $value | humanize }} in the last 24 hours "
                f"(spec.monitoring.spend.dailyBudgetUsd: ${_usd(budget)}). GET /admin/spend?"
                "group_by=team (then api_key) on the admin API shows who spent it; budgets "
                "per key, user or team (PUT /admin/budgets) cap it.",
            ))
        if spec.per_team:
            rules.append(rule(
                f"GpuProxyTeamDailySpend{suffix}", _team_expr(sel, spec.per_team, factor),
                "0m", severity,
                f"A team's spend {words} its daily budget on GpuProxyCluster {target}",
                "Team '{{ $labels.team }}' spent ${{ $value | humanize }} in the last 24 "
                "hours (spec.monitoring.spend.perTeam). GET /admin/spend?group_by=api_key&"
                "team=<team> on the admin API shows its keys; PUT /admin/budgets/team/<team> "
                "caps it.",
            ))
    return rules
