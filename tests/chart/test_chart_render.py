"""`helm lint --strict` and `helm template` of charts/gpuproxy-operator for every CI value set; each
rendered manifest must validate against the official Kubernetes schemas (the GpuProxyCluster
against our CRD, the ServiceMonitor against prometheus-operator's)."""

from __future__ import annotations

import tarfile
from pathlib import Path

import kubernetes_validate
import pytest
from tests.chart.helm import (
    CHART,
    CRD_SOURCE,
    NAMESPACE,
    VALUE_SETS,
    render,
    render_result,
    run_helm,
    values_files,
)
from tests.chart.schemas import SERVICEMONITOR_CRD, crd_validator, schema_errors

K8S_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())




@pytest.mark.parametrize("name", VALUE_SETS)
def test_helm_lint_strict(name: str) -> None:
    args = [arg for path in values_files(name) for arg in ("-f", str(path))]
    result = run_helm("lint", "--strict", str(CHART), "--namespace", NAMESPACE, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", VALUE_SETS)
def test_rendered_manifests_are_valid(name: str, version: str) -> None:
    manifests = render(values_files(name))
    assert manifests
    for manifest in manifests:
        what = f"{manifest['kind']} {manifest['metadata']['name']}"
        if manifest["kind"] == "GpuProxyCluster":
            assert schema_errors(crd_validator(CRD_SOURCE, "v1alpha1"), manifest) == [], what
        elif manifest["kind"] == "ServiceMonitor":
            validator = crd_validator(SERVICEMONITOR_CRD, "v1")
            assert schema_errors(validator, manifest) == [], what
        else:
            try:
                kubernetes_validate.validate(manifest, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{what}: {exc}")


def test_value_sets_cover_namespaced_and_cluster_installs() -> None:
    assert {"default", "namespaced-values", "cluster-values"} <= set(VALUE_SETS)


def test_default_install_is_cluster_wide_with_crd() -> None:
    manifests = render()
    kinds = sorted(m["kind"] for m in manifests)
    assert kinds == sorted([
        "ClusterRole", "ClusterRoleBinding", "ConfigMap", "CustomResourceDefinition",
        "Deployment", "Service", "ServiceAccount",
        "PodDisruptionBudget", "Role", "RoleBinding",  # HA: the PDB and the Lease's Role
        "ConfigMap", "ConfigMap",  # the Grafana dashboards (proxy, operator)
        "ClusterRole", "ClusterRole",  # tenants' edit and view, aggregated
    ])
    assert all(
        m["metadata"].get("namespace") == NAMESPACE
        for m in manifests
        if m["kind"] in ("ConfigMap", "Deployment", "Service", "ServiceAccount",
                         "PodDisruptionBudget", "Role", "RoleBinding")
    )


def test_helm_package_ships_the_chart_without_ci_files(tmp_path: Path) -> None:
    result = run_helm("package", str(CHART), "--destination", str(tmp_path))
    assert result.returncode == 0, result.stderr
    (archive,) = tmp_path.glob("gpuproxy-operator-*.tgz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames()}
    assert {"Chart.yaml", "values.yaml", "values.schema.json", "README.md",
            "templates/crd.yaml", "templates/NOTES.txt"} <= names
    assert not [n for n in names if n.startswith("ci/")]


def test_kubernetes_version_floor() -> None:
    """CEL validation rules in the CRD need Kubernetes 1.29."""
    assert render_result((), (), "--kube-version", "1.29.0").returncode == 0
    too_old = render_result((), (), "--kube-version", "1.28.9")
    assert too_old.returncode != 0
    assert "kubeVersion" in too_old.stderr
