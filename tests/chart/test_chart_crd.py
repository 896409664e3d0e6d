"""The CRD the chart ships (equal to crds/, kept on uninstall, acceptable to an apiserver) and the
optional GpuProxyCluster it renders (valid against the CRD incl. CEL rules, parsable, buildable)."""

from __future__ import annotations

import copy
import re

from tests.api.apiserver import admit
from tests.chart.helm import (
    CHART,
    CLUSTER_VALUES,
    CR_API,
    CRD_SOURCE,
    NAMESPACE,
    by_kind,
    load_yaml,
    notes,
    one,
    render,
    render_result,
    sync_module,
)
from tests.chart.schemas import crd_schema_problems

from gpuproxy_operator.api.cluster import parse_cluster
from gpuproxy_operator.builders import BuildInputs, DatabaseCredentials, build_all


def test_crd_is_the_generated_one_kept_on_uninstall() -> None:
    crd = one(render(), "CustomResourceDefinition")
    annotations = crd["metadata"].pop("annotations")
    assert annotations == {"helm.sh/resource-policy": "keep"}
    assert crd == load_yaml(CRD_SOURCE)


def test_crd_install_can_be_turned_off() -> None:
    assert by_kind(render((), ("crds.install=false",)), "CustomResourceDefinition") == []


def test_chart_copies_of_the_crd_are_in_sync() -> None:
    """templates/crd.yaml and the cluster.spec schema are generated from crds/; a stale copy
    means someone changed the API without running scripts/sync-chart-crd.py."""
    assert sync_module().main(["--check"]) == 0


def test_shipped_crd_uses_only_keywords_the_apiserver_accepts() -> None:
    crd = one(render(), "CustomResourceDefinition")
    for version in crd["spec"]["versions"]:
        assert crd_schema_problems(version["schema"]["openAPIV3Schema"]) == []


def test_the_chart_renders_only_the_cluster_resource() -> None:
    manifests = render((CLUSTER_VALUES,))
    cluster = one(manifests, "GpuProxyCluster")
    assert cluster["metadata"]["namespace"] == NAMESPACE
    # Only the operator's own workload: the proxy stack comes from the operator's builders.
    assert [m["metadata"]["name"] for m in by_kind(manifests, "Deployment")] == [
        "gp-gpuproxy-operator"
    ]
    assert not by_kind(manifests, "StatefulSet") + by_kind(manifests, "DaemonSet")
    spec = load_yaml(CLUSTER_VALUES)["cluster"]["spec"]
    assert cluster["spec"] == spec


def test_rendered_cluster_parses_and_builds() -> None:
    cluster_body = one(render((CLUSTER_VALUES,)), "GpuProxyCluster")
    parsed = parse_cluster(cluster_body)
    assert parsed.metadata.name == "prod"
    children = build_all(parsed, BuildInputs(DatabaseCredentials("gpuproxy", "pw")))
    assert {"Deployment", "StatefulSet", "NetworkPolicy"} <= {m["kind"] for m in children}


def test_cluster_waits_for_the_crd_on_a_first_install() -> None:
    """CRD and resource in one release: Helm cannot map the kind before the CRD exists, so
    the resource is rendered once the API is known (the next upgrade)."""
    sets = ("crds.install=true",)
    first = render((CLUSTER_VALUES,), sets)
    assert by_kind(first, "GpuProxyCluster") == []
    assert one(first, "CustomResourceDefinition")
    later = render((CLUSTER_VALUES,), sets, "--api-versions", CR_API)
    assert one(later, "GpuProxyCluster")["metadata"]["name"] == "prod"


def test_rendered_cluster_passes_the_crd_cel_rules() -> None:
    schema = load_yaml(CRD_SOURCE)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert sum(1 for _ in re.finditer("x-kubernetes-validations", CRD_SOURCE.read_text())) >= 8
    cluster = one(render((CLUSTER_VALUES,)), "GpuProxyCluster")
    assert admit(cluster, schema).errors == []
    # The same evaluation does catch a violation the values schema cannot express.
    bad = copy.deepcopy(cluster)
    bad["spec"].setdefault("autoscaling", {}).update(minReplicas=9, maxReplicas=3)
    assert admit(bad, schema).errors == [
        ".spec.autoscaling.minReplicas: minReplicas must be less than or equal to maxReplicas"
    ]


def test_cluster_name_limit_matches_the_crd() -> None:
    """The CRD caps metadata.name with a CEL rule; the values schema says the same up front."""
    rules = load_yaml(CRD_SOURCE)["spec"]["versions"][0]["schema"]["openAPIV3Schema"][
        "x-kubernetes-validations"]
    limits = [int(m.group(1)) for r in rules
              if (m := re.fullmatch(r"size\(self\.metadata\.name\) <= (\d+)", r["rule"]))]
    assert len(limits) == 1
    schema = load_yaml(CHART / "values.schema.json")
    assert schema["properties"]["cluster"]["properties"]["name"]["maxLength"] == limits[0]
    too_long = render_result((CLUSTER_VALUES,), (f"cluster.name={'a' * (limits[0] + 1)}",))
    assert too_long.returncode != 0
    assert "/cluster/name" in too_long.stderr


def test_notes_follow_the_rendered_cluster() -> None:
    assert f"kubectl -n {NAMESPACE} get gpc prod -w" in notes((CLUSTER_VALUES,))
    first_install = notes((CLUSTER_VALUES,), ("crds.install=true",))
    assert "was NOT applied" in first_install
    assert f"helm upgrade gp <chart> -n {NAMESPACE} --reuse-values" in first_install
