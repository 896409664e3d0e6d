"""values.yaml and values.schema.json: unknown or wrong values are rejected, real specs are not,
every value is documented (in values.yaml and the chart README), NOTES guide the user."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped,unused-ignore]
import pytest
import yaml
from tests.chart.helm import (
    CHART,
    CLUSTER_VALUES,
    CRD_SOURCE,
    NAMESPACE,
    NAMESPACED_VALUES,
    load_yaml,
    notes,
    one,
    render,
    render_result,
)
from tests.chart.schemas import schema_errors
from tests.tools import REPO_ROOT


@pytest.mark.parametrize(
    ("base", "sets", "message"),
    [
        ((), ("unknownKey=1",), "additional properties 'unknownKey' not allowed"),
        ((), ("metrics.serviceMonitor.intervall=30s",), "'intervall' not allowed"),
        ((), ("watch.namespaces[0]=Not_A_Namespace",), "/watch/namespaces/0"),
        ((), ("image.pullPolicy=Sometimes",), "/image/pullPolicy"),
        ((), ("cluster.create=true",), "missing properties 'proxy', 'database'"),
        ((CLUSTER_VALUES,), ("cluster.spec.proxy.replicass=3",), "'replicass' not allowed"),
        ((CLUSTER_VALUES,), ("cluster.spec.pgbouncer.poolMode=bogus",), "/pgbouncer/poolMode"),
        ((CLUSTER_VALUES,), ("cluster.spec.autoscaling.maxReplicas=0",), "/maxReplicas"),
    ],
)
def test_values_schema_rejects_mistakes(
    base: tuple[Path, ...], sets: tuple[str, ...], message: str
) -> None:
    result = render_result(base, sets)
    assert result.returncode != 0
    assert message in result.stderr


def test_values_schema_accepts_the_examples_as_cluster_spec(tmp_path: Path) -> None:
    """The cluster.spec schema is strict, but never stricter than the CRD: every example's spec
    renders as chart values."""
    examples = sorted((REPO_ROOT / "examples").glob("*.yaml"))
    specs = [
        doc["spec"]
        for path in examples
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8"))
        if doc and doc.get("kind") == "GpuProxyCluster"
    ]
    assert specs, "examples/*.yaml hold no GpuProxyCluster"
    for n, spec in enumerate(specs):
        values = tmp_path / f"example-{n}.yaml"
        values.write_text(
            yaml.safe_dump({"crds": {"install": False}, "cluster": {"create": True, "spec": spec}})
        )
        assert one(render((values,)), "GpuProxyCluster")["spec"] == spec


def test_values_yaml_validates_against_its_schema() -> None:
    schema = load_yaml(CHART / "values.schema.json")
    jsonschema.Draft7Validator.check_schema(schema)
    errors = schema_errors(jsonschema.Draft7Validator(schema), load_yaml(CHART / "values.yaml"))
    assert errors == []


def test_every_value_is_documented() -> None:
    """helm-docs convention: every value has a `# --` comment, on itself or on an enclosing key
    whose default is a whole object (e.g. `resources:`); plain sections need none."""
    lines = (CHART / "values.yaml").read_text(encoding="utf-8").splitlines()
    stack: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    undocumented = []
    for index, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "-")) or ":" not in stripped:
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        documented = _has_doc_comment(lines, index) or any(doc for _, doc in stack)
        is_section = stripped.endswith(":")
        if not documented and not is_section:
            undocumented.append(stripped)
        stack.append((indent, documented))
    assert undocumented == []


def test_chart_readme_lists_every_value() -> None:
    values = load_yaml(CHART / "values.yaml")
    readme = (CHART / "README.md").read_text(encoding="utf-8")
    documented = {
        line.split("`")[1] for line in readme.splitlines() if line.startswith("| `")
    }
    assert _leaf_paths(values) - documented == set()
    assert documented - _leaf_paths(values, keep_objects=True) == set(), "stale README rows"


def _leaf_paths(node: Any, prefix: str = "", keep_objects: bool = False) -> set[str]:
    """Dotted paths of values.yaml down to the leaves; empty maps/lists and the objects in
    WHOLE_OBJECT_VALUES are leaves. keep_objects adds the section paths in between."""
    if not isinstance(node, dict) or not node or prefix in WHOLE_OBJECT_VALUES:
        return {prefix}
    paths = {prefix} if keep_objects and prefix else set()
    for key, value in node.items():
        paths |= _leaf_paths(value, f"{prefix}.{key}" if prefix else key, keep_objects)
    return paths


# Values whose default is a whole object documented by one `# --` comment.
WHOLE_OBJECT_VALUES = {"resources", "podSecurityContext", "securityContext", "nodeTuning.sysctls"}


def _has_doc_comment(lines: list[str], index: int) -> bool:
    """The comment block right above the line starts with `# --`."""
    above = index - 1
    while above >= 0 and lines[above].strip().startswith("#"):
        if lines[above].strip().startswith("# --"):
            return True
        above -= 1
    return False


def test_notes_guide_a_new_install() -> None:
    text = notes()
    assert f"kubectl -n {NAMESPACE} rollout status deployment/gp-gpuproxy-operator" in text
    assert "It manages GpuProxyClusters in every namespace." in text
    assert "kubectl apply -f examples/gpuproxycluster-minimal.yaml" in text
    assert (REPO_ROOT / "examples" / "gpuproxycluster-minimal.yaml").is_file()
    assert "port-forward service/gp-gpuproxy-operator-metrics 8080" in text


def test_notes_for_a_namespaced_install_without_crd() -> None:
    text = notes((NAMESPACED_VALUES,))
    assert "It manages GpuProxyClusters in: team-a, team-b." in text
    assert "kubectl apply --server-side -f crds/gpuproxy.aiserve.farm_gpuproxyclusters.yaml" in text
    assert CRD_SOURCE.is_file()
