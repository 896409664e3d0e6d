"""The CRD's defaults pass the API server's own checks: kube-apiserver validates every `default`
against the schema and the CEL rules at its level and below, exactly as written, when the CRD
is created (a rule reading a key of `default: {}` is an error there, "no such key")."""

from __future__ import annotations

from typing import Any

import pytest
from tests.api.apiserver import CelRules, admit, default_errors
from tests.api.crd_schema import load_crd, openapi_schema
from tests.chart.helm import one, render


def _versions(crd: dict[str, Any]) -> list[dict[str, Any]]:
    return [v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"]]


def _shipped() -> dict[str, dict[str, Any]]:
    return {"crds/": load_crd(), "chart": one(render(), "CustomResourceDefinition")}


@pytest.mark.parametrize("source", ["crds/", "chart"])
@pytest.mark.parametrize("nested", [False, True], ids=["as-written", "nested-defaults"])
def test_every_default_satisfies_every_rule(source: str, nested: bool) -> None:
    rules = CelRules()
    for root in _versions(_shipped()[source]):
        assert default_errors(root, with_nested_defaults=nested, rules=rules) == []


def test_defaults_exist_where_rules_read_them() -> None:
    """The guard has something to check: objects with rules default to {} in the CRD."""
    spec = openapi_schema(load_crd())["properties"]["spec"]["properties"]
    for name in ("autoscaling", "pgbouncer", "redis"):
        assert spec[name]["default"] == {}
        assert spec[name]["x-kubernetes-validations"]


def _schema(rule: str) -> dict[str, Any]:
    """A CRD-like schema with one defaulted object and a rule over two of its fields."""
    return {
        "type": "object",
        "properties": {
            "scaling": {
                "type": "object",
                "default": {},
                "properties": {
                    "min": {"type": "integer", "default": 2},
                    "max": {"type": "integer", "default": 10},
                },
                "x-kubernetes-validations": [{"rule": rule, "message": "min <= max"}],
            },
        },
    }


def test_an_unguarded_rule_on_a_defaulted_object_is_caught() -> None:
    """What kube-apiserver 1.36 said of our CRD: "no such key: minReplicas evaluating rule"."""
    errors = default_errors(_schema("self.min <= self.max"), with_nested_defaults=False)
    assert len(errors) == 1
    assert "no such member" in errors[0]
    assert "self.min <= self.max" in errors[0]
    # With the defaults applied the same rule holds: only the as-written check catches it.
    assert default_errors(_schema("self.min <= self.max"), with_nested_defaults=True) == []


def test_a_guarded_rule_passes_and_still_rejects_bad_objects() -> None:
    schema = _schema("!has(self.min) || !has(self.max) || self.min <= self.max")
    assert default_errors(schema, with_nested_defaults=False) == []
    assert admit({"scaling": {"min": 3}}, schema).accepted
    assert admit({"scaling": {"min": 11}}, schema).errors == [".scaling: min <= max"]


def test_has_on_a_missing_parent_is_an_error_as_in_cel_go() -> None:
    """cel-go evaluates `e` in has(e.f) normally; cel-python alone would answer false."""
    rules = CelRules()
    from celpy import celtypes

    empty = celtypes.MapType({})
    assert rules.evaluate("has(self.a.b)", empty) is not None
    assert rules.evaluate("!has(self.a) || !has(self.a.b)", empty) is None
    assert rules.evaluate("has(self.a)", empty) == "failed"
