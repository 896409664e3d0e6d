"""Generates the GpuProxyCluster CustomResourceDefinition from the pydantic models.

Pydantic's JSON Schema is not a structural CRD schema: refs are inlined, Optional unwrapped,
titles dropped, numeric exclusive bounds turned into OpenAPI v3.0 booleans, CEL rules attached.
"""

from __future__ import annotations

import copy
import types
import typing
from typing import Any

from pydantic import BaseModel

from gpuproxy_operator.api.base import GROUP, KIND, PLURAL, SHORT_NAMES, SINGULAR, VERSION
from gpuproxy_operator.api.cluster import (
    MAX_NAME_LENGTH,
    GpuProxyClusterSpec,
    GpuProxyClusterStatus,
)
from gpuproxy_operator.api.rules import rules_of


def _cel_rules(model: type[BaseModel]) -> list[dict[str, str]]:
    return [entry for rule in rules_of(model) if (entry := rule.to_crd()) is not None]


def _models_by_name(root: type[BaseModel]) -> dict[str, type[BaseModel]]:
    found: dict[str, type[BaseModel]] = {}

    def visit(tp: Any) -> None:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if tp.__name__ in found:
                return
            found[tp.__name__] = tp
            for field in tp.model_fields.values():
                visit(field.annotation)
            return
        for arg in typing.get_args(tp):
            visit(arg)
        if isinstance(tp, types.UnionType):
            for arg in tp.__args__:
                visit(arg)

    visit(root)
    return found


def _structural(node: Any, defs: dict[str, Any], models: dict[str, type[BaseModel]]) -> Any:
    if isinstance(node, list):
        return [_structural(item, defs, models) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    rules: list[dict[str, str]] = []
    model: type[BaseModel] | None = None
    if "$ref" in node:
        name = node.pop("$ref").rsplit("/", 1)[-1]
        target = copy.deepcopy(defs[name])
        target.update({k: v for k, v in node.items() if k in ("description", "default")})
        node = target
        model = models.get(name)
        if model is not None:
            rules = _cel_rules(model)
    any_of = node.get("anyOf")
    if any_of is not None:
        non_null = [s for s in any_of if s.get("type") != "null"]
        if len(non_null) == 1 and len(non_null) < len(any_of):
            node.pop("anyOf")
            inner = _structural(non_null[0], defs, models)
            outer = {k: v for k, v in node.items() if k in ("description", "default")}
            node = {**inner, **outer}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("title", "propertyNames", "$defs"):
            continue
        if key == "additionalProperties" and isinstance(value, bool):
            continue
        if key == "default" and value is None:
            continue
        if key == "const":
            out["enum"] = [value]
            continue
        if key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
            continue
        if key == "properties":
            out[key] = {k: _structural(v, defs, models) for k, v in value.items()}
            continue
        if key == "patternProperties":
            # The apiserver forbids patternProperties; key patterns are CEL rules instead.
            (value_schema,) = value.values()
            out["additionalProperties"] = _structural(value_schema, defs, models)
            continue
        out[key] = _structural(value, defs, models)
    if model is not None and "properties" in out:
        _factory_defaults(model, out["properties"])
    if out.get("type") == "object" and "properties" in out:
        unset = _defaults_to_none(model)
        required = set(out.get("required", ()))
        for alias, prop in out["properties"].items():
            # A defaulted sub-object defaults to {} so the apiserver fills its nested defaults;
            # one that defaults to None stays unset (unset means "derived", e.g. resources). A
            # required one gets none: it is never defaulted, and its rules may need input.
            if (
                prop.get("type") == "object"
                and "properties" in prop
                and "default" not in prop
                and not prop.get("required")
                and alias not in unset
                and alias not in required
            ):
                prop["default"] = {}
    if rules:
        out["x-kubernetes-validations"] = copy.deepcopy(rules)
    return out


def _defaults_to_none(model: type[BaseModel] | None) -> set[str]:
    """Aliases of the model's fields whose default is None."""
    if model is None:
        return set()
    return {field.alias or name for name, field in model.model_fields.items()
            if field.default is None and field.default_factory is None}


def _factory_defaults(model: type[BaseModel], props: dict[str, Any]) -> None:
    """Show default_factory values as schema defaults, which pydantic leaves out."""
    for name, field in model.model_fields.items():
        factory = field.default_factory
        alias = field.alias or name
        if factory is None or alias not in props or "default" in props[alias]:
            continue
        if isinstance(factory, type) and issubclass(factory, BaseModel):
            continue  # the {} default below lets the apiserver fill nested defaults
        value = factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json", by_alias=True, exclude_none=True)
        elif isinstance(value, list):
            value = [v.model_dump(mode="json", by_alias=True, exclude_none=True)
                     if isinstance(v, BaseModel) else v for v in value]
        props[alias]["default"] = value


def build_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural openAPIV3Schema of one model."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    models = _models_by_name(model)
    schema: dict[str, Any] = _structural(raw, defs, models)
    _factory_defaults(model, schema.get("properties", {}))
    own_rules = _cel_rules(model)
    if own_rules:
        schema["x-kubernetes-validations"] = own_rules
    _mark_lists(schema)
    return schema


def _mark_lists(schema: dict[str, Any]) -> None:
    """Lists keyed by name or type become map lists: unique keys, mergeable by key."""
    props = schema.get("properties", {})
    for name, prop in props.items():
        if prop.get("type") == "array":
            items = prop.get("items", {})
            if name == "backends":
                prop["x-kubernetes-list-type"] = "map"
                prop["x-kubernetes-list-map-keys"] = ["name"]
            elif name == "conditions":
                prop["x-kubernetes-list-type"] = "map"
                prop["x-kubernetes-list-map-keys"] = ["type"]
            _mark_lists(items)
        elif prop.get("type") == "object":
            _mark_lists(prop)


_READY = '.status.conditions[?(@.type=="Ready")].status'


def build_crd() -> dict[str, Any]:
    """The whole CustomResourceDefinition manifest."""
    spec_schema = build_schema(GpuProxyClusterSpec)
    status_schema = build_schema(GpuProxyClusterStatus)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "gpuproxy"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": ["gpuproxy"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.proxy.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": [
                        {"name": "Ready", "type": "string", "jsonPath": _READY},
                        {"name": "Replicas", "type": "integer", "jsonPath": ".status.replicas"},
                        {
                            "name": "Connections",
                            "type": "integer",
                            "jsonPath": ".status.currentConnections",
                        },
                        {
                            "name": "Target",
                            "type": "integer",
                            "jsonPath": ".spec.autoscaling.targetConnections",
                        },
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "GpuProxyCluster runs a high-connection GPU inference "
                            "proxy with PgBouncer, Redis, node tuning, alerts and autoscaling.",
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                            "required": ["spec"],
                            "x-kubernetes-validations": [
                                {
                                    "rule": f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
                                    "message": f"metadata.name must be at most "
                                    f"{MAX_NAME_LENGTH} characters (child object names "
                                    "append suffixes to it)",
                                },
                                {
                                    # The API server allows dots in names; child Services
                                    # and labels need a DNS label, as the models require.
                                    "rule": "!self.metadata.name.contains('.')",
                                    "message": "metadata.name must be a DNS label (no dots): "
                                    "child Service names are built from it",
                                },
                            ],
                        }
                    },
                }
            ],
        },
    }
