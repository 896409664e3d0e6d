"""Every manifest the builders produce (test clusters and examples/*.yaml) is valid against the
official Kubernetes schemas (strict) or, for prometheus-operator kinds, against their CRDs."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped,unused-ignore]
import kubernetes_validate
import pytest
import yaml
from tests.operator.clusters import EXAMPLES, all_manifests

from gpuproxy_operator.builders.common import Manifest

SCHEMAS = Path(__file__).parent / "schemas"
CRD_FILES = {
    "PrometheusRule": SCHEMAS / "monitoring.coreos.com_prometheusrules.yaml",
    "ServiceMonitor": SCHEMAS / "monitoring.coreos.com_servicemonitors.yaml",
}
# The oldest Kubernetes we support and the newest the installed kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())

MANIFESTS = [(f"{name}/{m['kind']}/{m['metadata']['name']}", m)
             for name, ms in all_manifests().items() for m in ms]


def _closed(node: Any) -> Any:
    """OpenAPI v3.0 -> JSON Schema, with objects closed: the API server silently prunes
    unknown fields, which would make the operator see drift on every reconcile."""
    if isinstance(node, list):
        return [_closed(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _closed(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
    if (
        node.get("type") == "object"
        and "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@cache
def crd_validator(kind: str) -> jsonschema.Draft4Validator:
    crd = yaml.safe_load(CRD_FILES[kind].read_text(encoding="utf-8"))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _closed(version["schema"]["openAPIV3Schema"])
    # metadata is validated by the API server itself, not the CRD schema.
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft4Validator(schema)


def _ids(item: tuple[str, Manifest]) -> str:
    return item[0]


def test_examples_are_covered() -> None:
    names = {p.name for p in EXAMPLES}
    if not names:
        pytest.skip("no examples/*.yaml in the tree yet")
    assert any(key.startswith("example:") for key, _ in MANIFESTS)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("item", MANIFESTS, ids=[i for i, _ in MANIFESTS])
def test_manifest_is_valid(item: tuple[str, Manifest], version: str) -> None:
    _, manifest = item
    if manifest["kind"] in CRD_FILES:
        errors = [
            f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in crd_validator(manifest["kind"]).iter_errors(manifest)
        ]
        assert errors == []
    else:
        assert kubernetes_validate.validate(manifest, version, strict=True)


@pytest.mark.parametrize("kind", sorted(CRD_FILES))
def test_crd_validator_rejects_unknown_fields(kind: str) -> None:
    """Guards the closed-schema conversion: a typo must not pass silently."""
    manifest = next(m for _, m in MANIFESTS if m["kind"] == kind)
    broken = {**manifest, "spec": {**manifest["spec"], "typo": 1}}
    assert list(crd_validator(kind).iter_errors(broken))


def test_strict_kubernetes_validation_rejects_unknown_fields() -> None:
    manifest = next(m for _, m in MANIFESTS if m["kind"] == "Deployment")
    broken = {**manifest, "spec": {**manifest["spec"], "replica": 3}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.30.0", strict=True)
