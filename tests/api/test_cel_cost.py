"""The offline CEL cost estimator against figures from Kubernetes' and cel-go's own tests, and
the guard it gives the shipped CRD: no CR can be refused for cost, every iteration is bounded."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from tests.api.cel_cost import (
    PER_CALL_LIMIT,
    STATIC_COST_LIMIT,
    STATIC_CRD_COST_LIMIT,
    DeclType,
    crd_rule_costs,
    crd_total_cost,
    declared_type,
    estimate_rule_cost,
    unbounded_iterations,
    unknown_fields,
)
from tests.api.crd_schema import load_crd
from tests.chart.helm import one, render

Schema = dict[str, Any]
Generator = Callable[[int | None], Schema]  # a schema with the bound under test (None: unset)


# --- The generators of kubernetes/kubernetes staging/src/k8s.io/apiextensions-apiserver/pkg/
# apiserver/schema/cel/compilation_test.go (genArrayWithRule, genMapWithRule, ...) ------------


def _leaf(kind: str) -> Schema:
    """parseRuleType: duration/date/date-time are string formats, int-or-string an extension."""
    if kind in ("duration", "date", "date-time"):
        return {"type": "string", "format": kind}
    return {"x-kubernetes-int-or-string": True} if kind == "int-or-string" else {"type": kind}


def _bound(schema: Schema, key: str, value: int | None) -> Schema:
    return schema if value is None else {**schema, key: value}


def _array(item: Schema) -> Generator:
    return lambda n: _bound({"type": "array", "items": item}, "maxItems", n)


def _map(value: Schema) -> Generator:
    return lambda n: _bound({"type": "object", "additionalProperties": value}, "maxProperties", n)


def _string(**extra: Any) -> Generator:
    return lambda n: _bound({"type": "string", **extra}, "maxLength", n)


# genObjectArrayWithRule's items and genObjectForMap: a required and an optional string.
_OBJECT: Schema = {"type": "object", "required": ["required"],
                   "properties": {"required": {"type": "string"}, "optional": {"type": "string"}}}


def _nested_all_max(n: int | None) -> Schema:
    """genAllMaxNestedSpecWithRootRule: a list of maps of objects, every level bounded by n."""
    inner = _bound({**_OBJECT}, "maxProperties", n)
    return _array(_map(inner)(n))(n)


def _map_of_bounded_strings(n: int | None) -> Schema:
    """genNestedSpecWithRule: maxProperties and the values' maxLength are both n."""
    return _map(_string()(n))(n)


# (TestCostEstimation case name, rule, schema generator, expectedCalcCost (no bound),
#  setMaxElements, expectedSetCost); 0 means the Go test does not check that cost.
K8S_COST_CASES = [
    ("number array with all", "self.all(x, true)", _array(_leaf("number")), 4718591, 10, 32),
    ("string array with all", "self.all(x, true)", _array(_leaf("string")), 3145727, 20, 62),
    ("boolean array with all", "self.all(x, true)", _array(_leaf("boolean")), 1887437, 5, 17),
    ("array of objects with all", "self.all(x, true)", _array(_OBJECT), 555128, 50, 152),
    ("map of numbers with all", "self.all(x, true)", _map(_leaf("number")), 1348169, 10, 32),
    ("map of strings with all", "self.all(x, true)", _map(_leaf("string")), 1179647, 3, 11),
    ("map of objects with all", "self.all(x, true)", _map(_OBJECT), 428963, 20, 62),
    ("string with contains", "self.contains('test')", _string(), 314574, 10, 5),
    ("string with startsWith", "self.startsWith('test')", _string(), 2, 15, 2),
    ("concat string", 'size(self + "hello") > size("hello")', _string(), 314578, 4, 7),
    ("index of array with strings", "self[1] == self[1]", _array(_leaf("string")), 314577, 8,
     314577),
    ("O(n^2) loop with numbers", "self.all(x, self.all(y, true))", _array(_leaf("number")), 0,
     10, 352),
    ("O(n^3) loop with numbers", "self.all(x, self.all(y, self.all(z, true)))",
     _array(_leaf("number")), 0, 10, 3552),
    ("regex matches simple", 'self.matches("x")', _string(), 314574, 50, 22),
    ("regex matches empty string", '"".matches("(((((((((())))))))))[0-9]")', _string(), 7, 10,
     7),
    ("map of strings with value length", "self.all(x, x.contains(self[x]))",
     _map_of_bounded_strings, 2752507, 10, 72),
    ("set string maxLength to zero", 'self == "x"', _string(), 2, 0, 1),
    ("set bytes maxLength to zero", 'self == b"x"', _string(format="byte"), 2, 0, 1),
    ("set maxLength greater than estimated maxLength", "self.all(x, x == 0.0)",
     _array(_leaf("number")), 6291454, 3 * 1024 * 2048, 25165826),
    ("nested types with root rule with all supporting maxLength",
     'self.all(x, x["y"].required == "z")', _nested_all_max, 7340027, 10, 72),
    ("int-or-string array with all", "self.all(x, true)", _array(_leaf("int-or-string")),
     4718591, 10, 32),
    ("index of array with int-or-strings", "self[0] == 5", _array(_leaf("int-or-string")), 3,
     10, 3),
    ("date-time array with all", "self.all(x, true)", _array(_leaf("date-time")), 428963, 25, 77),
    ("map of durations with all", "self.all(x, true)", _map(_leaf("duration")), 1048577, 5, 17),
    ("check cost of size call", "oldSelf.size() == self.size()", _map(_leaf("integer")), 5, 10,
     5),
    ("check cost of timestamp comparison", 'self["a"] == self["b"]', _map(_leaf("date-time")),
     8, 7, 8),
    ("enums with maxLength equals to the longest possible value", "self.contains('A')",
     _string(enum=["A", "B", "C", "LongValue"]), 2, 1000, 401),
]


@pytest.mark.parametrize(
    ("rule", "schema", "calc_cost", "bound", "set_cost"),
    [pytest.param(*case[1:], id=case[0]) for case in K8S_COST_CASES],
)
def test_cost_matches_kubernetes_compilation_tests(
    rule: str, schema: Generator, calc_cost: int, bound: int, set_cost: int
) -> None:
    # Expected costs: TestCostEstimation in kubernetes/kubernetes staging/src/k8s.io/
    # apiextensions-apiserver/pkg/apiserver/schema/cel/compilation_test.go, case `id`.
    if calc_cost:
        assert estimate_rule_cost(rule, schema(None)) == calc_cost
    if set_cost:
        assert estimate_rule_cost(rule, schema(bound)) == set_cost


# Expected max costs: TestCost in google/cel-go checker/cost_test.go (the case named in the
# comment); its "hints" become schema bounds here (a string hint of 500 is maxLength 125 runes).
CEL_GO_CASES = [
    ("2 in [1, 2, 3]", {}, 13),  # "in"
    ("[1, 2, 3].all(x, true)", {}, 20),  # "all comprehension on literal"
    ("'123'.matches('[0-9]')", {}, 2),  # "variable cost function with constant"
    ("self.all(x, true)", _array(_leaf("integer"))(100), 302),  # "all comprehension"
    ("self.all(x, x.all(y, true))", _array(_array(_leaf("integer"))(10))(50), 1752),
    ("self.matches('[0-9]')", _string()(125), 103),  # "variable cost function"
    ("((5 != 6) == (1 == 2)) == ((3 <= 4) == (9 != 9))", {}, 7),  # "nested subexpression ..."
    ("[1,2,3,4,5].filter(x, x % 2 == 0)", {}, 101),  # ".filter list literal"
    ("[1,2,3,4,5].map(x, x)", {}, 86),  # ".map list literal"
    ("[1,2,3,4,5].map(x, x).exists(x, x == 5) == true", {}, 118),  # ".map.exists list literal"
    ("[[1, 1], [2, 2], [3, 3], [4, 4], [5, 5]].all(y, y.all(y, y == 1))", {}, 136),
    ("[1,2,3].all(i, i in [1,2,3].map(j, j + j))", {}, 230),  # "nested comprehension"
    ("dyn([1,2,3]).all(i, i in dyn([1,2,3]).map(j, j + j))", {}, 234),  # "nested dyn ..."
    ("['hello', 'hi'][0] != ['hello', 'bye'][1]", {}, 25),  # "literal list access"
]


@pytest.mark.parametrize(("rule", "schema", "cost"), CEL_GO_CASES)
def test_cost_matches_cel_go_cost_tests(rule: str, schema: Schema, cost: int) -> None:
    assert estimate_rule_cost(rule, schema or {"type": "object"}) == cost


def _crd(schema: Schema) -> dict[str, Any]:
    return {"spec": {"versions": [{"name": "v1", "schema": {"openAPIV3Schema": schema}}]}}


def test_cardinality_and_totals_match_the_apiserver() -> None:
    """kubernetes-sigs/cluster-api internal/topology/variables/
    clusterclass_variable_validation_test.go, "fail if x-kubernetes-validations has invalid
    rules: cost total exceeds total limit" (run through apiextensions' CRD validation): the
    unbounded list's rule 'exceeds budget by factor of more than 100x', the map's rule only
    'contributed to ... cost total exceeding cost limit' (>= 1% of it), the field's rule is
    under 1%, and the total 'exceeds budget by factor of more than 100x'."""
    item_rule = [{"rule": "self.contains('keyword')"}]
    schema = {"type": "object", "properties": {
        "array": {"type": "array", "items": {"type": "string", "maxLength": 500000,
                                             "x-kubernetes-validations": item_rule}},
        "map": {"type": "object", "maxProperties": 10000, "additionalProperties": {
            "type": "string", "maxLength": 2048, "x-kubernetes-validations": item_rule}},
        "field": {"type": "integer", "x-kubernetes-validations": [
            {"rule": "self > 50 && self < 100"}]},
    }}
    costs = {c.path: c for c in crd_rule_costs(_crd(schema))}
    # Unbounded list: maxCardinality(MinSerializedSize of a string, 2) = 3 MiB / 3.
    assert (costs[".array[]"].cost, costs[".array[]"].cardinality) == (200001, 1048576)
    assert costs[".array[]"].total > 100 * STATIC_COST_LIMIT
    assert (costs[".map{}"].cost, costs[".map{}"].cardinality) == (821, 10000)
    assert STATIC_CRD_COST_LIMIT // 100 <= costs[".map{}"].total <= STATIC_COST_LIMIT
    assert costs[".field"].total < STATIC_CRD_COST_LIMIT // 100
    assert crd_total_cost(list(costs.values())) > 100 * STATIC_CRD_COST_LIMIT


def test_map_keys_have_the_apiservers_zero_size() -> None:
    # Kubernetes types map keys as its StringType (MaxElements 0): the keys' matches() costs
    # ceil(0.1 * (0 + 1)) * ceil(0.25 * len(regex)) whatever the keys may hold.
    mapping = declared_type({"type": "object", "additionalProperties": {"type": "string"}})
    assert mapping is not None
    assert mapping.key == DeclType("string", max_elements=0, min_size=2, bounded=False)


# --- The shipped CRD -------------------------------------------------------------------------


@pytest.fixture(params=["crds", "chart"])
def shipped_crd(request: pytest.FixtureRequest) -> dict[str, Any]:
    """crds/ as generated, and the chart's templates/crd.yaml as Helm renders it."""
    if request.param == "crds":
        return load_crd()
    return one(render(), "CustomResourceDefinition")


def test_no_custom_resource_can_be_refused_for_cost(shipped_crd: dict[str, Any]) -> None:
    """Each rule's worst case times how often it can run stays under the per-evaluation
    runtime limit, so a CR is never refused for cost (and far from the CRD-time limits)."""
    costs = crd_rule_costs(shipped_crd)
    assert len(costs) >= 8
    too_costly = [f"{c.path}: {c.rule!r} costs {c.cost} x {c.cardinality} = {c.total}"
                  for c in costs if c.total > PER_CALL_LIMIT]
    assert too_costly == []
    assert crd_total_cost(costs) <= STATIC_CRD_COST_LIMIT // 10


def test_rules_iterate_only_bounded_collections(shipped_crd: dict[str, Any]) -> None:
    assert unbounded_iterations(shipped_crd) == []


def test_rules_select_only_declared_fields(shipped_crd: dict[str, Any]) -> None:
    assert unknown_fields(shipped_crd) == []


# --- The guard can fail ----------------------------------------------------------------------


def _sysctls(**bounds: int) -> dict[str, Any]:
    rule = "self.sysctls.all(k, k.matches('^[a-z0-9_]+([.][a-z0-9_-]+)+$'))"
    sysctls = {"type": "object", "additionalProperties": {"type": "string"}, **bounds}
    return _crd({"type": "object", "properties": {"nodeTuning": {
        "type": "object", "properties": {"sysctls": sysctls},
        "x-kubernetes-validations": [{"rule": rule}]}}})


def test_an_unbounded_map_iterated_by_matches_is_flagged() -> None:
    crd = _sysctls()
    assert [c.cost for c in crd_rule_costs(crd)] == [4718583]  # 3 + 393215 keys x 12
    assert [c.total > PER_CALL_LIMIT for c in crd_rule_costs(crd)] == [True]
    problems = unbounded_iterations(crd)
    assert len(problems) == 2
    assert "iterates .nodeTuning.sysctls without maxItems/maxProperties" in problems[0]
    assert "calls matches() on .nodeTuning.sysctls{keys}" in problems[1]
    bounded = _sysctls(maxProperties=64)
    assert [c.cost for c in crd_rule_costs(bounded)] == [3 + 64 * 12]
    assert unbounded_iterations(bounded) == []


def _backends(name: Schema, **bounds: int) -> dict[str, Any]:
    backend = {"type": "object", "properties": {"name": name}}
    rules = [{"rule": "self.all(b, b.name.startsWith('gpu-'))"}]
    return _crd({"type": "object", "properties": {"backends": {
        "type": "array", "items": backend, **bounds, "x-kubernetes-validations": rules}}})


def test_an_unbounded_list_and_string_are_flagged() -> None:
    rule = '.backends: "self.all(b, b.name.startsWith(\'gpu-\'))"'
    assert unbounded_iterations(_backends({"type": "string"})) == [
        f"{rule} iterates .backends without maxItems/maxProperties",
        f"{rule} calls startsWith() on .backends[].name, a string without maxLength",
    ]
    assert unbounded_iterations(_backends({"type": "string", "maxLength": 63}, maxItems=16)) == []
    # An enum bounds a string too.
    assert unbounded_iterations(_backends({"type": "string", "enum": ["a"]}, maxItems=16)) == []


def test_undefined_fields_are_flagged() -> None:
    crd = _crd({"type": "object", "properties": {"proxy": {
        "type": "object", "properties": {"port": {"type": "integer"}},
        "x-kubernetes-validations": [{"rule": "self.prot > 0 && has(self.port)"}]}}})
    assert unknown_fields(crd) == [
        ".proxy: 'self.prot > 0 && has(self.port)': undefined field 'prot' of .proxy"
    ]
