"""Validators the chart tests apply to rendered manifests: CRD schemas as strict JSON Schema,
the keywords an apiserver accepts in a CRD, and the restricted Pod Security Standard (CEL rules
and defaulting: tests/api/apiserver.py)."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped,unused-ignore]
from tests.chart.helm import load_yaml, sync_module
from tests.tools import REPO_ROOT

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


def crd_schema_problems(node: dict[str, Any], path: str = "") -> list[str]:
    problems = [f"{path or '(root)'}: {key} is not allowed in a CRD schema"
                for key in node if key not in CRD_KEYWORDS]
    if node.get("uniqueItems") is True:
        problems.append(f"{path}: uniqueItems true is forbidden")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: properties and additionalProperties are mutually exclusive")
    for name, child in (node.get("properties") or {}).items():
        problems += crd_schema_problems(child, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            problems += crd_schema_problems(node[key], f"{path}[{key}]")
    return problems


def restricted_violations(pod: dict[str, Any]) -> list[str]:
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
