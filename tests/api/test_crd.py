"""The checked-in CRD is generated from the models, structural, and valid Kubernetes."""

from __future__ import annotations

import kubernetes_validate
from crd_schema import CRD_FILE, load_crd, openapi_schema, walk

from gpuproxy_operator.commands.crd import render_crd_yaml

K8S_VERSION = "1.30.0"


def test_checked_in_crd_matches_the_models() -> None:
    assert CRD_FILE.read_text() == render_crd_yaml(), (
        "crds/ drifted from the API models: run `make crd` and commit the result"
    )


def test_crd_is_valid_kubernetes() -> None:
    kubernetes_validate.validate(load_crd(), K8S_VERSION, strict=True)


def test_schema_is_structural() -> None:
    root = openapi_schema(load_crd())
    problems = []
    for path, node in walk(root):
        extensions = ("x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields")
        if "type" not in node and not any(node.get(e) for e in extensions):
            problems.append(f"{path}: no type")
        for forbidden in (
            "$ref", "$defs", "title", "nullable", "const", "propertyNames", "patternProperties",
        ):
            if forbidden in node:
                problems.append(f"{path}: has {forbidden}")
        if "properties" in node and "additionalProperties" in node:
            problems.append(f"{path}: properties and additionalProperties together")
        for combinator in ("anyOf", "allOf", "oneOf", "not"):
            for sub in node.get(combinator, []) if combinator != "not" else [node.get("not")]:
                if sub and any(k in sub for k in ("type", "default", "description", "nullable")):
                    problems.append(f"{path}: {combinator} carries type/default/description")
        if node.get("default") is None and "default" in node:
            problems.append(f"{path}: default null")
    assert problems == []


def test_every_spec_field_is_described() -> None:
    spec = openapi_schema(load_crd())["properties"]["spec"]
    undocumented = [path for path, node in walk(spec) if path and "description" not in node
                    and not path.endswith(("[]", "{}"))]
    assert undocumented == []


def test_scale_subresource_and_printer_columns() -> None:
    version = load_crd()["spec"]["versions"][0]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.proxy.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Ready", "Replicas", "Connections", "Target", "Phase", "Age"]
    names = load_crd()["spec"]["names"]
    assert names["shortNames"] == ["gpc"]
    assert "gpuproxy" in names["categories"]


def test_map_lists_and_defaults() -> None:
    spec = openapi_schema(load_crd())["properties"]["spec"]["properties"]
    backends = spec["proxy"]["properties"]["backends"]
    assert backends["x-kubernetes-list-type"] == "map"
    assert backends["x-kubernetes-list-map-keys"] == ["name"]
    status = openapi_schema(load_crd())["properties"]["status"]["properties"]
    assert status["conditions"]["x-kubernetes-list-map-keys"] == ["type"]
    assert spec["pgbouncer"]["properties"]["maxClientConn"]["default"] == 100000
    assert spec["proxy"]["properties"]["connectionsPerReplica"]["default"] == 100000
    assert spec["autoscaling"]["properties"]["targetConnections"]["default"] == 1000000
    # Node tuning is only asked for (the legacy fields have no default any more), and images
    # are the operator's: nothing of them is stored in a CR by defaulting.
    tuning = spec["nodeTuning"]["properties"]
    assert [name for name, prop in tuning.items() if "default" in prop] == ["enabled"]
    for component in ("proxy", "pgbouncer", "redis"):
        assert "default" not in spec[component]["properties"]["image"]
