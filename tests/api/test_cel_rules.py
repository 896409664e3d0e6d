"""The CRD's CEL rules, evaluated with cel-python, agree with the models' own validators."""

from __future__ import annotations

import copy
from typing import Any

import celpy
import pytest
from crd_schema import load_crd, openapi_schema, walk

from gpuproxy_operator.api.cluster import InvalidSpecError, parse_cluster


def _rules() -> list[tuple[str, dict[str, str]]]:
    spec = openapi_schema(load_crd())["properties"]["spec"]
    return [
        (path, rule)
        for path, node in walk(spec)
        for rule in node.get("x-kubernetes-validations", [])
    ]


def _at(obj: dict[str, Any], path: str) -> Any:
    for part in filter(None, path.split(".")):
        if obj is None or part not in obj:
            return None
        obj = obj[part]
    return obj


def _failing_rules(spec: dict[str, Any]) -> list[str]:
    env = celpy.Environment()
    failed = []
    for path, rule in _rules():
        if path.endswith(("[]", "{}")):
            targets = _collection(spec, path)
        else:
            value = _at(spec, path)
            targets = [] if value is None else [value]
        for target in targets:
            program = env.program(env.compile(rule["rule"]))
            if not bool(program.evaluate({"self": celpy.json_to_cel(target)})):
                failed.append(rule["message"])
    return failed


def _collection(spec: dict[str, Any], path: str) -> list[Any]:
    parent = _at(spec, path.rstrip("[]{}"))
    if isinstance(parent, list):
        return parent
    if isinstance(parent, dict):
        return list(parent.values())
    return []


def _defaulted(**overrides: Any) -> dict[str, Any]:
    """A spec as the apiserver stores it: defaults filled, then the overrides deep-merged."""
    raw = {
        "proxy": {"backends": [{"name": "a", "url": "http://a:8000"}]},
        "database": {"host": "pg", "credentialsSecret": "db"},
    }
    body = {"metadata": {"name": "t"}, "spec": raw}
    spec: dict[str, Any] = parse_cluster(body).spec.model_dump(
        mode="json", by_alias=True, exclude_none=True
    )
    spec = copy.deepcopy(spec)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split("__")
        node = spec
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return spec


def test_every_rule_compiles_and_a_default_spec_passes() -> None:
    assert len(_rules()) >= 8
    assert _failing_rules(_defaulted()) == []


CASES = [
    ({"autoscaling__minReplicas": 11}, "minReplicas must be less than or equal to maxReplicas"),
    ({"proxy__backends": [{"name": "a", "url": "http://a", "weight": 5, "healthPath": "/h"}]},
     "only takes effect with loadBalancing.strategy weighted_round_robin"),
    ({"proxy__adminPort": 8080}, "port and adminPort must differ"),
    ({"proxy__healthCheck__timeoutSeconds": 5}, "timeoutSeconds must be less than intervalSeconds"),
    ({"proxy__auth__jwtIssuer": "https://issuer"}, "need jwtSecretRef"),
    ({"pgbouncer__defaultPoolSize": 600}, "defaultPoolSize must not exceed maxDbConnections"),
    ({"redis__mode": "external"}, "url is required when mode is external"),
    ({"autoscaling__behavior__scaleUp__policies": []},
     "policies must not be empty unless selectPolicy is Disabled"),
]


@pytest.mark.parametrize(("overrides", "message"), CASES)
def test_cel_and_pydantic_reject_the_same_specs(overrides: dict[str, Any], message: str) -> None:
    spec = _defaulted(**overrides)
    failed = _failing_rules(spec)
    assert any(message in m for m in failed), failed
    with pytest.raises(InvalidSpecError) as info:
        parse_cluster({"metadata": {"name": "t"}, "spec": spec})
    assert any(message.split(" ")[0] in reason for _, reason in info.value.problems)


def test_weights_allowed_with_weighted_round_robin() -> None:
    spec = _defaulted(
        proxy__backends=[{"name": "a", "url": "http://a", "weight": 5, "healthPath": "/h"}],
        proxy__loadBalancing={"strategy": "weighted_round_robin"},
    )
    assert _failing_rules(spec) == []
    parse_cluster({"metadata": {"name": "t"}, "spec": spec})


def test_sysctl_keys_are_checked() -> None:
    spec = _defaulted(nodeTuning__sysctls={"net.core.somaxconn": "1024", "rm -rf": "1"})
    assert any("kernel parameter names" in m for m in _failing_rules(spec))


@pytest.mark.parametrize(("name", "ok"), [("a" * 40, True), ("a" * 41, False)])
def test_root_rule_bounds_the_name_length(name: str, ok: bool) -> None:
    env = celpy.Environment()
    (rule,) = openapi_schema(load_crd())["x-kubernetes-validations"]
    program = env.program(env.compile(rule["rule"]))
    result = program.evaluate({"self": celpy.json_to_cel({"metadata": {"name": name}})})
    assert bool(result) is ok
    raw = {"proxy": {"backends": [{"name": "a", "url": "http://a"}]},
           "database": {"host": "pg", "credentialsSecret": "db"}}
    if ok:
        parse_cluster({"metadata": {"name": name}, "spec": raw})
    else:
        with pytest.raises(InvalidSpecError):
            parse_cluster({"metadata": {"name": name}, "spec": raw})
