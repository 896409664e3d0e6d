"""`helm lint --strict` and `helm template` of charts/gpuproxy-operator for every CI value set; each
rendered manifest must validate against the official Kubernetes schemas (the GpuProxyCluster
against our CRD, the ServiceMonitor against prometheus-operator's)."""

from __future__ import annotations

import argparse
import copy
import re
import tarfile
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import celpy  # type: ignore[import-untyped,unused-ignore]
import jsonschema  # type: ignore[import-untyped,unused-ignore]
import kubernetes_validate
import pytest
import yaml
from celpy.adapter import json_to_cel  # type: ignore[import-untyped,unused-ignore]
from tests.chart.helm import (
    CHART,
    CLUSTER_VALUES,
    CR_API,
    NAMESPACE,
    NAMESPACED_VALUES,
    VALUE_SETS,
    by_kind,
    load_yaml,
    notes,
    one,
    render,
    render_result,
    run_helm,
    sync_module,
)
from tests.tools import REPO_ROOT

from gpuproxy_operator.api.cluster import parse_cluster
from gpuproxy_operator.builders import BuildInputs, DatabaseCredentials, build_all
from gpuproxy_operator.cli import build_parser
from gpuproxy_operator.commands.run import namespaces_from

K8S_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
CRD_SOURCE = REPO_ROOT / "crds" / "gpuproxy.aiserve.farm_gpuproxyclusters.yaml"
# prometheus-operator's ServiceMonitor CRD, vendored for the builders' schema tests.
SERVICEMONITOR_CRD = (
    REPO_ROOT / "tests" / "operator" / "schemas" / "monitoring.coreos.com_servicemonitors.yaml"
)


@cache
def crd_validator(path: Path, version: str) -> jsonschema.Draft7Validator:
    """A CRD's openAPIV3Schema as a strict JSON Schema (unknown fields are errors, as with
    `kubectl apply --validate=strict`)."""
    crd = load_yaml(path)
    served = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    schema = sync_module().openapi_to_jsonschema(
        served["schema"]["openAPIV3Schema"], strict_objects=True
    )
    return jsonschema.Draft7Validator(schema)


def schema_errors(validator: jsonschema.Draft7Validator, manifest: dict[str, Any]) -> list[str]:
    return [
        f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
        for e in validator.iter_errors(manifest)
    ]


def values_files(name: str) -> tuple[Path, ...]:
    return VALUE_SETS[name]


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
    ])
    assert all(
        m["metadata"].get("namespace") == NAMESPACE
        for m in manifests
        if m["kind"] in ("ConfigMap", "Deployment", "Service", "ServiceAccount")
    )


def test_operator_deployment_shape() -> None:
    deployment = one(render(), "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
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
    assert {r["metadata"]["namespace"] for r in by_kind(manifests, "Role")} == {"team-a", "team-b"}
    assert {b["metadata"]["namespace"] for b in by_kind(manifests, "RoleBinding")} == {
        "team-a",
        "team-b",
    }


def test_namespaced_install_defaults_to_the_release_namespace() -> None:
    manifests = render((), ("watch.allNamespaces=false",))
    (container,) = one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert f"--namespace={NAMESPACE}" in container["args"]
    assert [r["metadata"]["namespace"] for r in by_kind(manifests, "Role")] == [NAMESPACE]


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
    assert {"Deployment", "StatefulSet", "DaemonSet"} <= {m["kind"] for m in children}


def test_cluster_waits_for_the_crd_on_a_first_install() -> None:
    """CRD and resource in one release: Helm cannot map the kind before the CRD exists, so
    the resource is rendered once the API is known (the next upgrade)."""
    sets = ("crds.install=true",)
    first = render((CLUSTER_VALUES,), sets)
    assert by_kind(first, "GpuProxyCluster") == []
    assert one(first, "CustomResourceDefinition")
    later = render((CLUSTER_VALUES,), sets, "--api-versions", CR_API)
    assert one(later, "GpuProxyCluster")["metadata"]["name"] == "prod"


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
WHOLE_OBJECT_VALUES = {"resources", "podSecurityContext", "securityContext"}


def _has_doc_comment(lines: list[str], index: int) -> bool:
    """The comment block right above the line starts with `# --`."""
    above = index - 1
    while above >= 0 and lines[above].strip().startswith("#"):
        if lines[above].strip().startswith("# --"):
            return True
        above -= 1
    return False


# JSONSchemaProps keywords a v1 CRD may use (apiextensions-apiserver rejects the rest, e.g.
# patternProperties, $ref, definitions, dependencies, additionalItems).
CRD_KEYWORDS = {
    "type", "format", "description", "default", "enum", "nullable", "pattern",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
    "minLength", "maxLength", "minItems", "maxItems", "uniqueItems", "minProperties",
    "maxProperties", "required", "items", "properties", "additionalProperties", "allOf",
    "anyOf", "oneOf", "not", "example", "externalDocs", "title",
    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-embedded-resource",
    "x-kubernetes-int-or-string", "x-kubernetes-list-map-keys", "x-kubernetes-list-type",
    "x-kubernetes-map-type", "x-kubernetes-validations",
}


def _crd_schema_problems(node: dict[str, Any], path: str = "") -> list[str]:
    problems = [f"{path or '(root)'}: {key} is not allowed in a CRD schema"
                for key in node if key not in CRD_KEYWORDS]
    if node.get("uniqueItems") is True:
        problems.append(f"{path}: uniqueItems true is forbidden")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: properties and additionalProperties are mutually exclusive")
    for name, child in (node.get("properties") or {}).items():
        problems += _crd_schema_problems(child, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            problems += _crd_schema_problems(node[key], f"{path}[{key}]")
    return problems


def test_shipped_crd_uses_only_keywords_the_apiserver_accepts() -> None:
    crd = one(render(), "CustomResourceDefinition")
    for version in crd["spec"]["versions"]:
        assert _crd_schema_problems(version["schema"]["openAPIV3Schema"]) == []


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


def test_notes_follow_the_rendered_cluster() -> None:
    assert f"kubectl -n {NAMESPACE} get gpc prod -w" in notes((CLUSTER_VALUES,))
    first_install = notes((CLUSTER_VALUES,), ("crds.install=true",))
    assert "was NOT applied" in first_install
    assert f"helm upgrade gp <chart> -n {NAMESPACE} --reuse-values" in first_install


def _defaulted(schema: dict[str, Any], value: Any) -> Any:
    """Structural defaulting as the apiserver does it before validation: missing properties
    with a default get it, recursively (through lists and maps too)."""
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        out = {k: _defaulted(props.get(k) or schema.get("additionalProperties") or {}, v)
               for k, v in value.items()}
        for name, sub in props.items():
            if name not in out and "default" in sub:
                out[name] = _defaulted(sub, copy.deepcopy(sub["default"]))
        return out
    if isinstance(value, list):
        return [_defaulted(schema.get("items") or {}, v) for v in value]
    return value


def _cel_violations(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """Every x-kubernetes-validations rule of the schema evaluated at its node."""
    out = []
    for rule in schema.get("x-kubernetes-validations", []):
        env = celpy.Environment()
        program = env.program(env.compile(rule["rule"]))
        if not bool(program.evaluate({"self": json_to_cel(value)})):
            out.append(f"{path or '(root)'}: {rule['message']}")
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for key, child in value.items():
            sub = props.get(key) or (extra if isinstance(extra, dict) else None)
            if sub:
                out += _cel_violations(sub, child, f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            out += _cel_violations(schema["items"], item, f"{path}[{index}]")
    return out


def test_rendered_cluster_passes_the_crd_cel_rules() -> None:
    schema = load_yaml(CRD_SOURCE)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert sum(1 for _ in re.finditer("x-kubernetes-validations", CRD_SOURCE.read_text())) >= 8
    cluster = _defaulted(schema, one(render((CLUSTER_VALUES,)), "GpuProxyCluster"))
    assert _cel_violations(schema, cluster) == []
    # The same evaluation does catch a violation the values schema cannot express.
    bad = copy.deepcopy(cluster)
    bad["spec"]["autoscaling"].update(minReplicas=9, maxReplicas=3)
    assert _cel_violations(schema, bad) == [
        ".spec.autoscaling: minReplicas must be less than or equal to maxReplicas"
    ]


def test_helm_package_ships_the_chart_without_ci_files(tmp_path: Path) -> None:
    result = run_helm("package", str(CHART), "--destination", str(tmp_path))
    assert result.returncode == 0, result.stderr
    (archive,) = tmp_path.glob("gpuproxy-operator-*.tgz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames()}
    assert {"Chart.yaml", "values.yaml", "values.schema.json", "README.md",
            "templates/crd.yaml", "templates/NOTES.txt"} <= names
    assert not [n for n in names if n.startswith("ci/")]


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


def test_kubernetes_version_floor() -> None:
    """CEL validation rules in the CRD need Kubernetes 1.29."""
    assert render_result((), (), "--kube-version", "1.29.0").returncode == 0
    too_old = render_result((), (), "--kube-version", "1.28.9")
    assert too_old.returncode != 0
    assert "kubeVersion" in too_old.stderr


def _restricted_violations(pod: dict[str, Any]) -> list[str]:
    """The Pod Security Standard `restricted` profile (Kubernetes 1.30), for one pod spec."""
    problems = []
    pod_sc = pod.get("securityContext") or {}
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            problems.append(flag)
    allowed_volumes = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                       "persistentVolumeClaim", "projected", "secret"}
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= allowed_volumes:
            problems.append(f"volume {volume['name']}: {kinds - allowed_volumes}")
    for container in [*pod.get("initContainers", []), *pod["containers"]]:
        sc = container.get("securityContext") or {}
        name = container["name"]
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation must be false")
        if "ALL" not in (sc.get("capabilities") or {}).get("drop", []):
            problems.append(f"{name}: must drop ALL capabilities")
        if set((sc.get("capabilities") or {}).get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: adds capabilities")
        if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
            problems.append(f"{name}: runAsNonRoot")
        if (sc.get("runAsUser", pod_sc.get("runAsUser")) or 1) == 0:
            problems.append(f"{name}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccompProfile")
        if any(p.get("hostPort") for p in container.get("ports", [])):
            problems.append(f"{name}: hostPort")
    return problems


@pytest.mark.parametrize("name", VALUE_SETS)
def test_operator_pod_meets_the_restricted_pod_security_standard(name: str) -> None:
    pod = one(render(values_files(name)), "Deployment")["spec"]["template"]["spec"]
    assert _restricted_violations(pod) == []
    # The check itself notices a relaxed context.
    relaxed = render(values_files(name), ("securityContext.allowPrivilegeEscalation=true",))
    assert _restricted_violations(one(relaxed, "Deployment")["spec"]["template"]["spec"]) == [
        "operator: allowPrivilegeEscalation must be false"
    ]
