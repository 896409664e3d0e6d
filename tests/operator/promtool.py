"""Prometheus' own rule checker and evaluator, `promtool` (Debian package prometheus, installed by
`make bootstrap`), for the alert rules of the builders and the chart; plus the label sets the
scrapes put on series and the rendering of annotation templates for expected alerts."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tests.tools import find_executable

# What a ServiceMonitor on `<cluster>-proxy-metrics` (port `admin`) puts on every series of a
# pod (prometheus-operator's generated relabelings: namespace, service, pod, container, job from
# the Service name, endpoint from the port name), and what a PodMonitor puts instead.
SCRAPE_LABELS = ("namespace", "pod", "job", "service", "endpoint", "container", "instance")


def service_monitor_target(namespace: str, service: str, pod: str, container: str,
                           port: str) -> dict[str, str]:
    return {"namespace": namespace, "service": service, "job": service, "pod": pod,
            "container": container, "endpoint": port, "instance": "10.1.2.3:9090"}


def pod_monitor_target(namespace: str, monitor: str, pod: str, container: str,
                       port: str) -> dict[str, str]:
    return {"namespace": namespace, "job": f"{namespace}/{monitor}", "pod": pod,
            "container": container, "endpoint": port, "instance": "10.1.2.3:9090"}


def promtool_binary() -> Path:
    return find_executable(
        "promtool", provider="Debian package prometheus, installed by scripts/bootstrap.sh")


def series(name: str, labels: Mapping[str, str]) -> str:
    inner = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


@dataclass
class Case:
    """One scenario: recorded input series and, per evaluation time, the alerts that fire."""

    name: str
    input_series: list[tuple[str, str]]  # (series, promtool values notation)
    expect: list[tuple[str, str, list[dict[str, Any]]]] = field(default_factory=list)
    """(eval time, alert name, expected alerts: [] means not firing)."""

    def to_promtool(self) -> dict[str, Any]:
        return {
            "interval": "1m",
            "name": self.name,
            "input_series": [{"series": s, "values": v} for s, v in self.input_series],
            "alert_rule_test": [
                {"eval_time": at, "alertname": alert, "exp_alerts": alerts}
                for at, alert, alerts in self.expect
            ],
        }


def expected_alert(rule: Mapping[str, Any], value: str,
                   labels: Mapping[str, str]) -> dict[str, Any]:
    """The firing alert of `rule` with result labels `labels`: its labels, and annotations
    rendered for the `$value` a human expects (e.g. "10%" after humanizePercentage)."""
    all_labels = {**labels, **rule["labels"]}
    return {"exp_labels": all_labels,
            "exp_annotations": {k: render_template(v, value, all_labels)
                                for k, v in rule["annotations"].items()}}


_TEMPLATE = re.compile(r"\{\{\s*(\$value|\$labels\.([a-z_]+))\s*(\|\s*(\w+)\s*)?\}\}")


def render_template(text: str, value: str, labels: Mapping[str, str]) -> str:
    """The few template forms the rules use: $value through a formatting function, whose
    output the caller states, and $labels.<name>."""

    def one(match: re.Match[str]) -> str:
        if match.group(2):
            return labels[match.group(2)]
        assert match.group(4) in ("humanize", "humanizePercentage"), match.group(0)
        return value

    rendered = _TEMPLATE.sub(one, text)
    assert "{{" not in rendered, f"unhandled template in {text!r}"
    return rendered


def rules_by_name(groups: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["alert"]: dict(r) for g in groups for r in g["rules"]}


@dataclass(frozen=True)
class PromtoolResult:
    returncode: int
    output: str


def _run(*args: str, cwd: Path) -> PromtoolResult:
    proc = subprocess.run(
        [str(promtool_binary()), *args], cwd=cwd, capture_output=True, text=True,
        timeout=300, check=False,
    )
    return PromtoolResult(proc.returncode, proc.stdout + proc.stderr)


def check_rules(workdir: Path, groups: Sequence[Mapping[str, Any]]) -> PromtoolResult:
    """`promtool check rules` of the groups as one rule file (syntax, templates, names)."""
    path = workdir / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": list(groups)}, sort_keys=False))
    return _run("check", "rules", path.name, cwd=workdir)


def run_rule_tests(workdir: Path, groups: Sequence[Mapping[str, Any]],
                   cases: Sequence[Case]) -> PromtoolResult:
    """`promtool test rules`: evaluate the groups over each case's series, as Prometheus does."""
    (workdir / "rules.yaml").write_text(yaml.safe_dump({"groups": list(groups)},
                                                       sort_keys=False))
    tests = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m",
             "tests": [c.to_promtool() for c in cases]}
    (workdir / "tests.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    return _run("test", "rules", "tests.yaml", cwd=workdir)



def covered(cases: Sequence[Case]) -> tuple[set[str], set[str]]:
    """Alert names with a firing expectation, and with a not-firing one."""
    firing = {alert for c in cases for _, alert, alerts in c.expect if alerts}
    quiet = {alert for c in cases for _, alert, alerts in c.expect if not alerts}
    return firing, quiet
