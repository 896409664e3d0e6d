"""The operator Deployment, its Service/ServiceMonitor, its arguments (parsed by the operator's own
CLI), image reference, ServiceAccount and pod security, for cluster-wide and namespaced installs."""

from __future__ import annotations

import argparse
from pathlib import Path
from urllib.parse import urlparse

import pytest
from tests.chart.helm import (
    CHART,
    NAMESPACE,
    NAMESPACED_VALUES,
    VALUE_SETS,
    by_kind,
    load_yaml,
    one,
    render,
    render_result,
    values_files,
)
from tests.chart.schemas import restricted_violations

from gpuproxy_operator.cli import build_parser
from gpuproxy_operator.commands.run import lease_config, namespaces_from
from gpuproxy_operator.leader import LeaseConfig


def test_operator_deployment_shape() -> None:
    deployment = one(render(), "Deployment")
    spec = deployment["spec"]
    # Two pods, one leader (the Lease): an update starts a follower before the leader stops.
    assert spec["replicas"] == 2
    assert spec["strategy"] == {"type": "RollingUpdate",
                                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == one(render(), "ServiceAccount")["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    assert container["args"][:2] == ["run", "--all-namespaces"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"health": 8081, "metrics": 8080}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["resources"]["requests"] == {"cpu": "100m", "memory": "192Mi"}
    assert container["resources"]["limits"] == {"memory": "384Mi"}
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    # Selector labels are a subset of the pod labels and never include the version.
    selector = spec["selector"]["matchLabels"]
    assert selector.items() <= spec["template"]["metadata"]["labels"].items()
    assert "app.kubernetes.io/version" not in selector
    # Preferably on two nodes.
    (term,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == selector
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"


def test_leader_election_args_and_the_pod_name_as_identity(
        monkeypatch: pytest.MonkeyPatch) -> None:
    (container,) = one(render(), "Deployment")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]
           if "valueFrom" in e}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
    monkeypatch.setenv("POD_NAME", "gp-gpuproxy-operator-7d9f-abcde")
    monkeypatch.setenv("POD_NAMESPACE", NAMESPACE)
    args = parse_run_args(container["args"])
    election = lease_config(args)
    assert election is not None
    assert election == LeaseConfig(namespace=NAMESPACE, identity="gp-gpuproxy-operator-7d9f-abcde",
                                   name="gp-gpuproxy-operator", lease_duration=15,
                                   renew_deadline=10, retry_period=2)
    assert election.problems() == []
    assert (args.kube_api_qps, args.kube_api_burst, args.resync_seconds) == (20, 30, 600)


def test_without_leader_election_there_is_one_pod_and_recreate() -> None:
    sets = ("leaderElection.enabled=false", "replicaCount=1")
    deployment = one(render((), sets), "Deployment")
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert lease_config(parse_run_args(container["args"])) is None
    assert by_kind(render((), sets), "PodDisruptionBudget") == []
    refused = render_result((), ("leaderElection.enabled=false",))
    assert refused.returncode != 0
    assert "replicaCount > 1 needs leaderElection.enabled" in refused.stderr
    bad = render_result((), ("leaderElection.renewDeadlineSeconds=15",))
    assert bad.returncode != 0
    assert "leaseDurationSeconds must exceed renewDeadlineSeconds" in bad.stderr


def test_pod_disruption_budget_keeps_one_operator_pod() -> None:
    manifests = render()
    pdb = one(manifests, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["metadata"]["namespace"] == NAMESPACE
    pod_labels = one(manifests, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert by_kind(render((), ("podDisruptionBudget.enabled=false",)), "PodDisruptionBudget") == []


def test_metrics_service_targets_the_operator_pod() -> None:
    manifests = render()
    service = one(manifests, "Service")
    pod_labels = one(manifests, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}
    ]
    without = render((), ("metrics.enabled=false",))
    assert by_kind(without, "Service") == []
    (container,) = one(without, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert parse_run_args(container["args"]).metrics_port == 0
    assert [p["name"] for p in container["ports"]] == ["health"]


def parse_run_args(args: list[str]) -> argparse.Namespace:
    """The container's args as the operator's own CLI parses them (fails on unknown flags)."""
    parsed = build_parser("run").parse_args(args)
    assert parsed.command == "run"
    return parsed


@pytest.mark.parametrize(
    ("values", "sets", "namespaces"),
    [
        ((), (), ()),
        ((NAMESPACED_VALUES,), (), ("team-a", "team-b")),
        ((), ("watch.allNamespaces=false",), (NAMESPACE,)),
    ],
)
def test_container_args_mean_what_the_values_say(
    values: tuple[Path, ...], sets: tuple[str, ...], namespaces: tuple[str, ...],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for var in ("GPUPROXY_WATCH_NAMESPACE", "GPUPROXY_METRICS_PORT", "GPUPROXY_LIVENESS"):
        monkeypatch.delenv(var, raising=False)
    (container,) = one(render(values, sets), "Deployment")["spec"]["template"]["spec"][
        "containers"]
    args = parse_run_args(container["args"])
    assert namespaces_from(args) == namespaces
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert args.liveness == f"http://0.0.0.0:{ports['health']}/healthz"
    assert args.metrics_port == ports["metrics"]
    assert container["livenessProbe"]["httpGet"]["path"] == urlparse(args.liveness).path


def test_service_monitor_selects_the_metrics_service() -> None:
    manifests = render((), ("metrics.serviceMonitor.enabled=true",))
    monitor = one(manifests, "ServiceMonitor")
    service = one(manifests, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}


def test_checksum_annotation_follows_the_operator_environment() -> None:
    def checksum(*sets: str) -> str:
        deployment = one(render((), sets), "Deployment")
        value: str = deployment["spec"]["template"]["metadata"]["annotations"]["checksum/env"]
        return value

    base = checksum()
    assert len(base) == 64
    assert checksum("operator.env.LOG_FORMAT=json") != base
    assert checksum("operator.env.LOG_FORMAT=text") not in (base, checksum("operator.env.A=1"))
    # Unrelated values do not restart the operator through this annotation.
    assert checksum("podAnnotations.team=ml") == base


def test_namespaced_install_watches_only_its_namespaces() -> None:
    manifests = render(values_files("namespaced-values"))
    (container,) = one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert "--all-namespaces" not in container["args"]
    assert [a for a in container["args"] if a.startswith("--namespace")] == [
        "--namespace=team-a",
        "--namespace=team-b",
    ]
    assert by_kind(manifests, "CustomResourceDefinition") == []
    assert by_kind(manifests, "ClusterRole") == []
    assert by_kind(manifests, "ClusterRoleBinding") == []
    watching = {r["metadata"]["namespace"] for r in by_kind(manifests, "Role")
                if not r["metadata"]["name"].endswith("-leader-election")}
    assert watching == {"team-a", "team-b"}
    assert {b["metadata"]["namespace"] for b in by_kind(manifests, "RoleBinding")
            if not b["metadata"]["name"].endswith("-leader-election")} == {"team-a", "team-b"}


def test_namespaced_install_defaults_to_the_release_namespace() -> None:
    manifests = render((), ("watch.allNamespaces=false",))
    (container,) = one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert f"--namespace={NAMESPACE}" in container["args"]
    assert sorted(r["metadata"]["name"] for r in by_kind(manifests, "Role")) == [
        "gp-gpuproxy-operator", "gp-gpuproxy-operator-leader-election"]
    assert {r["metadata"]["namespace"] for r in by_kind(manifests, "Role")} == {NAMESPACE}


@pytest.mark.parametrize(
    ("sets", "image"),
    [
        ((), "aiserve/gpuproxy-operator:0.1.0"),
        (("image.tag=0.2.0-rc1",), "aiserve/gpuproxy-operator:0.2.0-rc1"),
        ((f"image.digest=sha256:{'a' * 64}", "image.tag=ignored"),
         f"aiserve/gpuproxy-operator@sha256:{'a' * 64}"),
    ],
)
def test_operator_image_reference(sets: tuple[str, ...], image: str) -> None:
    (container,) = one(render((), sets), "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["image"] == image


def test_image_tag_defaults_to_the_app_version() -> None:
    chart = load_yaml(CHART / "Chart.yaml")
    (container,) = one(render(), "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["image"].endswith(f":{chart['appVersion']}")


def test_existing_service_account_must_be_named() -> None:
    result = render_result((), ("serviceAccount.create=false",))
    assert result.returncode != 0
    assert "serviceAccount.name is required" in result.stderr
    manifests = render((), ("serviceAccount.create=false", "serviceAccount.name=ops-robot"))
    assert by_kind(manifests, "ServiceAccount") == []
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "ops-robot"
    (binding,) = by_kind(manifests, "ClusterRoleBinding")
    assert binding["subjects"][0]["name"] == "ops-robot"


@pytest.mark.parametrize("name", VALUE_SETS)
def test_operator_pod_meets_the_restricted_pod_security_standard(name: str) -> None:
    pod = one(render(values_files(name)), "Deployment")["spec"]["template"]["spec"]
    assert restricted_violations(pod) == []
    # The check itself notices a relaxed context.
    relaxed = render(values_files(name), ("securityContext.allowPrivilegeEscalation=true",))
    assert restricted_violations(one(relaxed, "Deployment")["spec"]["template"]["spec"]) == [
        "operator: allowPrivilegeEscalation must be false"
    ]
