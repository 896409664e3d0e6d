"""One table of GpuProxyCluster cases, both sides: the pydantic models (`parse_cluster`, what
`render` and the operator use) and the CRD as kube-apiserver applies it (unknown fields,
defaulting, OpenAPI validation, list-map keys, CEL) accept and refuse exactly the same rows."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.api.apiserver import CelRules, admit
from tests.api.crd_schema import ROOT, load_crd, openapi_schema
from tests.chart.helm import CLUSTER_VALUES, one, render

from gpuproxy_operator.api.cluster import InvalidSpecError, parse_cluster

REMOVE = object()
SCHEMA = openapi_schema(load_crd())
RULES = CelRules()
ADMIN_TOKEN_AUTH = {"adminTokenSecretRef": {"name": "auth", "key": "admin"}}


def base() -> dict[str, Any]:
    """A small valid cluster that gives every object a value to mutate."""
    return {
        "apiVersion": "gpuproxy.aiserve.farm/v1alpha1",
        "kind": "GpuProxyCluster",
        "metadata": {"name": "t", "namespace": "ns"},
        "spec": {
            "proxy": {"backends": [{"name": "a", "url": "http://a.gpu.svc:8000"}],
                      "tolerations": [{"key": "gpu", "operator": "Exists"}]},
            "database": {"host": "pg", "credentialsSecret": "db"},
            "autoscaling": {"behavior": {
                "scaleUp": {"stabilizationWindowSeconds": 0,
                            "policies": [{"type": "Pods", "value": 4, "periodSeconds": 15}]},
                "scaleDown": {"stabilizationWindowSeconds": 300,
                              "policies": [{"type": "Percent", "value": 10,
                                            "periodSeconds": 60}]},
            }},
        },
    }


def _set(body: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of `body` with `path` ("spec.proxy.backends[0].weight") set or removed."""
    out = copy.deepcopy(body)
    parts = [int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", path)]
    node: Any = out
    for part in parts[:-1]:
        node = node[part] if isinstance(part, int) else node.setdefault(part, {})
    if value is REMOVE:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value
    return out


@dataclass(frozen=True)
class Case:
    """One row: a body and what both sides must say (None: accept; else a fragment both
    sides' reasons contain, or "" for refused without a shared wording)."""

    id: str
    body: dict[str, Any]
    refused: str | None = None


def change(id_: str, refused: str | None, **paths: Any) -> Case:
    body = base()
    for dotted, value in paths.items():
        body = _set(body, dotted.replace("__", "."), value)
    return Case(id_, body, refused)


HAND_WRITTEN = [
    change("base", None),
    change("weights-with-weighted-round-robin", None,
           spec__proxy__loadBalancing={"strategy": "weighted_round_robin"},
           spec__proxy__backends=[{"name": "a", "url": "http://a:1", "weight": 5},
                                  {"name": "b", "url": "https://b:2/v1"}]),
    change("engine-aware-strategies", None,
           spec__proxy__loadBalancing={"strategy": "least_load", "perModel": {
               "llama-3-8b": "prefix_affinity", "tenant-lora": "session_affinity"}}),
    change("external-redis-with-url", None, spec__redis={"mode": "external",
                                                         "url": "rediss://r:6380/0"}),
    change("scale-down-disabled-without-policies", None,
           spec__autoscaling__behavior__scaleDown={"stabilizationWindowSeconds": 0,
                                                   "selectPolicy": "Disabled",
                                                   "policies": []}),
    change("unlimited-db-connections", None, spec__pgbouncer={"maxDbConnections": 0,
                                                              "defaultPoolSize": 900}),
    change("integer-quantity", None, spec__proxy__resources={"requests": {"cpu": 2}}),
    change("null-object-is-defaulted", None, spec__autoscaling=None),
    change("spend-alert-amounts", None, spec__monitoring__spend={
        "dailyBudgetUsd": 250.5, "perTeam": {"ml": 100, "": 5}, "warningPercent": 0}),
    change("spend-budget-zero", "", spec__monitoring__spend={"dailyBudgetUsd": 0}),
    change("spend-team-amount-negative", "", spec__monitoring__spend={"perTeam": {"ml": -1}}),
    change("spend-warning-100", "", spec__monitoring__spend={"warningPercent": 100}),
    change("null-optional-field", None, spec__redis={"url": None}),
    change("name-of-40-characters", None, metadata__name="a" * 40),
    change("jwt-claims-with-secret", None, spec__proxy__auth={
        "jwtIssuer": "https://issuer", "jwtAudience": "gpu",
        "jwtSecretRef": {"name": "jwt", "key": "secret"}}),
    change("api-key-cache-bounds", None, spec__proxy__auth={
        "apiKeyCacheSeconds": 600, "apiKeyCacheMaxStaleSeconds": 0}),
    change("grace-override-of-drain-delay-plus-margin", None,
           spec__proxy__terminationGracePeriodSeconds=30),
    change("grace-override-without-drain-delay", None,
           spec__proxy__terminationGracePeriodSeconds=20,
           spec__proxy__shutdown={"drainDelaySeconds": 0}),
    change("resources-unset-are-derived", None, spec__redis={"resources": {}}),
    # What an older CRD stored in every cluster: accepted, ignored, named in NodeTuningReady.
    change("legacy-node-tuning-fields", None, spec__nodeTuning={
        "enabled": True, "image": "busybox:1.37",
        "sysctls": {"net.core.somaxconn": "65535", "rm -rf": "1"},
        "nodeSelector": {"a": "b"}, "tolerations": [{"operator": "Exists"}]}),
    change("images-pinned-by-digest", None,
           spec__proxy__image="registry.example/gpuproxy-proxy@sha256:" + "a" * 64,
           spec__pgbouncer__image="registry.example/pgbouncer:1.24",
           spec__redis__image="registry.example/redis:7.4"),
    change("proxy-network-policy", None, spec__proxy__networkPolicy={
        "clientCidrs": ["10.0.0.0/8", "fd00::/8"], "clientNamespaces": ["ingress"],
        "metricsFrom": [{"namespaceSelector": {"kubernetes.io/metadata.name": "monitoring"}},
                        {"podSelector": {"app": "prom"}}]}),
    change("proxy-network-policy-off", None, spec__proxy__networkPolicy={"enabled": False}),
    change("backend-discovery-only", None, spec__proxy__backends=[],
           spec__proxy__backendDiscovery=[{"name": "h100", "service": "vllm", "port": 8000}]),
    change("backend-discovery-from-a-service-and-labels", None, spec__proxy__backendDiscovery=[
        {"name": "h100", "service": "vllm-h100", "port": "http"},
        {"name": "l4", "selector": {"app": "vllm-l4"}, "port": 8000, "scheme": "https"}]),
    change("client-timeouts-for-slow-uploads", None, spec__proxy__clientTimeouts={
        "bodySeconds": 600, "bodyMinBytesPerSecond": 0, "writeSeconds": 120}),
    change("external-redis-with-password", None, spec__redis={
        "mode": "external", "url": "rediss://r:6380/0",
        "passwordSecretRef": {"name": "redis", "key": "password"}}),
    change("metering-spool-and-retention", None, spec__proxy__metering={
        "spoolSizeMib": 2048, "onSpoolFull": "drop_oldest", "retentionDays": 365}),
    change("metering-unknown-spool-policy", "", spec__proxy__metering={
        "onSpoolFull": "block"}),
    change("tls-from-a-cert-manager-secret", None,
           spec__proxy__tls={"secretName": "gpuproxy-tls", "minVersion": "1.3"}),
    change("tls-with-plain-http-refused", None,
           spec__proxy__tls={"secretName": "gpuproxy-tls"}, spec__proxy__allowPlainHttp=False),
    change("plain-http-acknowledged", None, spec__proxy__allowPlainHttp=True),
    change("tls-version-below-1.2", "", spec__proxy__tls={"secretName": "t", "minVersion": "1.1"}),
    change("tls-without-secret-name", "", spec__proxy__tls={}),
    change("token-limits-and-budgets", None,
           spec__proxy__rateLimits={"tokensPerMinute": {"perApiKey": 100000, "perTeam": 0},
                                    "tokensPerDay": {"perUser": 10_000_000},
                                    "defaultMaxTokens": 512},
           spec__proxy__budgets={"enabled": True, "prices": {
               "llama-3-70b": {"input": "0.59", "output": "0.79"}, "tiny": {"input": "0"}},
               "defaultPrice": {"input": "1", "output": "2.000001"}}),
    change("price-as-a-number", "spec.proxy.budgets.prices.m.input",
           spec__proxy__budgets={"prices": {"m": {"input": 0.5}}}),
    change("price-negative", "spec.proxy.budgets.defaultPrice.output",
           spec__proxy__budgets={"defaultPrice": {"output": "-1"}}),
    change("admission-and-retries", None,
           spec__proxy__admission={"enabled": True, "maxInFlightPerBackend": 32,
                                   "maxQueue": 500, "queueTimeoutSeconds": 10,
                                   "priorities": {"batch": {"weight": 1},
                                                  "interactive": {"weight": 4,
                                                                  "teams": ["search"]}},
                                   "defaultPriority": "batch"},
           spec__proxy__upstream={"retry": {"maxAttempts": 1, "budgetPercent": 10}}),
    change("admission-queue-timeout-zero", "spec.proxy.admission.queueTimeoutSeconds",
           spec__proxy__admission={"queueTimeoutSeconds": 0}),
    change("retry-budget-above-100-percent", "spec.proxy.upstream.retry.budgetPercent",
           spec__proxy__upstream={"retry": {"budgetPercent": 150}}),
    # One row per cross-field (CEL) rule.
    change("admission-unknown-default-priority", "defaultPriority must be",
           spec__proxy__admission={"defaultPriority": "gold"}),
    change("plain-http-refused-without-tls", "allowPlainHttp is false, so tls is required",
           spec__proxy__allowPlainHttp=False),
    change("plain-http-allowed-with-tls", "allowPlainHttp true and tls together",
           spec__proxy__tls={"secretName": "gpuproxy-tls"}, spec__proxy__allowPlainHttp=True),
    change("min-above-max", "minReplicas must be less than or equal to maxReplicas",
           spec__autoscaling__minReplicas=5, spec__autoscaling__maxReplicas=4),
    change("weight-without-weighted-round-robin", "only takes effect with",
           spec__proxy__backends=[{"name": "a", "url": "http://a:1", "weight": 5}]),
    change("port-equals-admin-port", "port and adminPort must differ",
           spec__proxy__adminPort=8080),
    change("admin-api-port-equals-port", "adminApiPort must differ from port and adminPort",
           spec__proxy__adminApiPort=8080, spec__proxy__auth=ADMIN_TOKEN_AUTH),
    change("admin-api-port-equals-admin-port",
           "adminApiPort must differ from port and adminPort", spec__proxy__adminApiPort=9090,
           spec__proxy__auth=ADMIN_TOKEN_AUTH),
    change("admin-api-port-moved", None, spec__proxy__adminApiPort=9443,
           spec__proxy__auth=ADMIN_TOKEN_AUTH),
    # Without an admin token the port is not used: an existing adminPort 9091 stays valid.
    change("admin-port-on-9091-without-admin-token", None, spec__proxy__adminPort=9091),
    change("admin-port-on-9091-with-admin-token", "adminApiPort must differ",
           spec__proxy__adminPort=9091, spec__proxy__auth=ADMIN_TOKEN_AUTH),
    change("health-timeout-not-below-interval",
           "timeoutSeconds must be less than intervalSeconds",
           spec__proxy__healthCheck={"timeoutSeconds": 5, "intervalSeconds": 5}),
    change("issuer-without-secret", "need jwtSecretRef",
           spec__proxy__auth={"jwtIssuer": "https://issuer"}),
    change("audience-without-secret", "need jwtSecretRef",
           spec__proxy__auth={"jwtAudience": "gpu"}),
    change("pool-above-db-connections", "defaultPoolSize must not exceed maxDbConnections",
           spec__pgbouncer__defaultPoolSize=600),
    change("external-redis-without-url", "url is required when mode is external",
           spec__redis__mode="external"),
    change("grace-override-shorter-than-drain-delay-plus-margin",
           "terminationGracePeriodSeconds must be at least shutdown.drainDelaySeconds + 20",
           spec__proxy__terminationGracePeriodSeconds=29),
    change("grace-override-shorter-than-a-raised-drain-delay",
           "terminationGracePeriodSeconds must be at least shutdown.drainDelaySeconds + 20",
           spec__proxy__terminationGracePeriodSeconds=60,
           spec__proxy__shutdown={"drainDelaySeconds": 60}),
    change("backup-without-claim", "enabled backups need claimName",
           spec__database__backup={"enabled": True}),
    change("backup-with-claim", None,
           spec__database__backup={"enabled": True, "claimName": "gpuproxy-backups",
                                   "schedule": "@daily", "timeZone": "Europe/Berlin"}),
    change("backup-schedule-not-cron", "",
           spec__database__backup={"enabled": True, "claimName": "b", "schedule": "daily"}),
    change("empty-policies-not-disabled", "policies must not be empty",
           spec__autoscaling__behavior__scaleUp__policies=[]),
    change("network-peer-without-selectors", "a peer needs namespaceSelector or podSelector",
           spec__proxy__networkPolicy={"metricsFrom": [{}]}),
    change("backend-discovery-service-and-selector",
           "backendDiscovery: service or selector, not both", spec__proxy__backendDiscovery=[
               {"name": "h100", "service": "vllm", "selector": {"app": "vllm"}, "port": 80}]),
    change("backend-discovery-neither-service-nor-selector",
           "backendDiscovery: service or selector, not both",
           spec__proxy__backendDiscovery=[{"name": "h100", "port": 80}]),
    change("backend-discovery-without-port", "",
           spec__proxy__backendDiscovery=[{"name": "h100", "service": "vllm"}]),
    change("client-cidr-not-a-cidr", "", spec__proxy__networkPolicy={"clientCidrs": ["10.0.0.0"]}),
    change("client-namespace-not-a-name", "",
           spec__proxy__networkPolicy={"clientNamespaces": ["Not_A_Name"]}),
    change("name-of-41-characters", "", metadata__name="a" * 41),
    change("name-with-a-dot", "", metadata__name="a.b"),
    change("duplicate-backend-names", "",
           spec__proxy__backends=[{"name": "a", "url": "http://a:1"},
                                  {"name": "a", "url": "http://b:1"}]),
    # Typos, wrong types, missing fields.
    change("typo-in-a-field", "", spec__proxy__replica=3),
    change("typo-in-a-section", "", spec__autoscalng={"enabled": True}),
    change("typo-in-a-list-item", "", spec__proxy__backends__0__wieght=2),
    change("client-timeout-in-milliseconds", "", spec__proxy__clientTimeouts={
        "bodyMilliseconds": 500}),
    change("client-timeout-fractional", "", spec__proxy__clientTimeouts={"bodySeconds": 0.5}),
    change("integer-as-string", "", spec__proxy__replicas="3"),
    change("integer-as-float", "", spec__proxy__replicas=3.5),
    change("boolean-as-string", "", spec__paused="true"),
    change("string-as-integer", "", spec__redis__maxmemory=16),
    change("fractional-quantity-number", "", spec__proxy__resources={"requests": {"cpu": 0.5}}),
    change("label-value-not-a-string", "", spec__proxy__nodeSelector={"gpu": 1}),
    change("object-as-string", "", spec__proxy__auth="on"),
    change("missing-database", "", spec__database=REMOVE),
    change("missing-backend-url", "", spec__proxy__backends__0__url=REMOVE),
    change("no-backends", "at least one backend: backends or backendDiscovery",
           spec__proxy__backends=[]),
    change("backends-absent", "at least one backend: backends or backendDiscovery",
           spec__proxy__backends=REMOVE),
    change("backend-url-not-a-url", "", spec__proxy__backends__0__url="not a url"),
    change("backend-url-other-scheme", "", spec__proxy__backends__0__url="ftp://a/b"),
    change("backend-url-with-credentials", "",
           spec__proxy__backends__0__url="http://user:pw@a:8000"),
    change("too-many-backends", "", spec__proxy__backends=[
        {"name": f"b{i}", "url": f"http://b{i}:8000"} for i in range(257)]),
    change("too-many-sysctls", "", spec__nodeTuning__sysctls={
        f"net.core.k{i}": "1" for i in range(65)}),
]


def _leaves(schema: dict[str, Any], value: Any, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Scalar schema nodes reachable from `value` through objects and existing list items."""
    kind = schema.get("type")
    if kind == "object" and "properties" in schema:
        for name, sub in schema["properties"].items():
            child = value.get(name) if isinstance(value, dict) else None
            yield from _leaves(sub, child if child is not None else {}, f"{path}.{name}")
    elif kind == "array":
        if isinstance(value, list) and value and isinstance(schema.get("items"), dict):
            yield from _leaves(schema["items"], value[0], f"{path}[0]")
    elif kind in ("string", "integer", "number", "boolean") or schema.get(
            "x-kubernetes-int-or-string"):
        yield path, schema


def _bad_values(node: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """Values the node's own schema refuses, one per constraint."""
    kind = node.get("type")
    if "enum" in node:
        yield "enum", "not-one-of-them"
    if node.get("x-kubernetes-int-or-string"):
        yield "type", True
        return
    yield "type", {"string": 7, "integer": "7", "number": "0.5", "boolean": "yes"}[kind]
    if "minimum" in node:
        yield "minimum", node["minimum"] - (0 if node.get("exclusiveMinimum") else 1)
    if "maximum" in node:
        yield "maximum", node["maximum"] + (0 if node.get("exclusiveMaximum") else 1)
    if "maxLength" in node:
        yield "maxLength", "a" * (node["maxLength"] + 1)
    if "pattern" in node:
        pattern = re.compile(node["pattern"])
        bad = next(v for v in ("NOT VALID!", "", "-", "a b") if not pattern.search(v))
        yield "pattern", bad


def generated() -> list[Case]:
    """A refused row for every enum, type, bound and pattern in the schema."""
    cases = []
    body = base()
    for path, node in _leaves(SCHEMA["properties"]["spec"], body["spec"], "spec"):
        for constraint, value in _bad_values(node):
            cases.append(Case(f"{path}-{constraint}", _set(body, path, value), ""))
    return cases


def documented() -> list[Case]:
    """Every cluster the docs show: the examples, the chart's, and the README's patches."""
    cases = []
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "GpuProxyCluster":
                cases.append(Case(f"{path.name}:{doc['metadata']['name']}", doc))
    cases.append(Case("chart-cluster-values", one(render((CLUSTER_VALUES,)), "GpuProxyCluster")))
    readme = Path(ROOT / "README.md").read_text()
    for i, patch in enumerate(re.findall(r"kubectl patch gpc \S+ --type merge -p '([^']+)'",
                                         readme)):
        merged = base()
        merged["spec"].update(json.loads(patch)["spec"])
        cases.append(Case(f"readme-patch-{i}", merged))
    return cases


def _model_says(body: dict[str, Any]) -> list[str]:
    try:
        parse_cluster(copy.deepcopy(body))
    except InvalidSpecError as exc:
        return [f"{path}: {reason}" for path, reason in exc.problems]
    return []


ALL = HAND_WRITTEN + generated() + documented()


def test_the_table_covers_every_rule_and_constraint() -> None:
    assert len(ALL) > 150
    rules = [r for _, node in _walk(SCHEMA) for r in node.get("x-kubernetes-validations", [])]
    covered = {c.refused for c in HAND_WRITTEN if c.refused}
    for rule in rules:
        hit = any(fragment in rule["message"] for fragment in covered) or any(
            c.refused == "" and _rule_refuses(rule, c) for c in HAND_WRITTEN)
        assert hit, f"no row for the rule {rule['message']!r}"


def _walk(node: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield "", node
    for child in node.get("properties", {}).values():
        yield from _walk(child)
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            yield from _walk(node[key])


def _rule_refuses(rule: dict[str, str], case: Case) -> bool:
    return any(rule["message"] in e for e in admit(case.body, SCHEMA, RULES).errors)


@pytest.mark.parametrize("case", ALL, ids=[c.id for c in ALL])
def test_models_and_crd_agree(case: Case) -> None:
    model = _model_says(case.body)
    server = admit(copy.deepcopy(case.body), SCHEMA, RULES).errors
    if case.refused is None:
        assert (model, server) == ([], [])
        return
    assert model, f"the models accept what should be refused; the API server says {server}"
    assert server, f"the API server accepts what the models refuse: {model}"
    if case.refused:
        assert any(case.refused in m for m in model), model
        assert any(case.refused in s for s in server), server


def test_all_problems_in_one_pass() -> None:
    """Field errors and cross-field rules of the same object come together, not in rounds."""
    body = _set(base(), "spec.proxy.port", 80)
    body = _set(body, "spec.proxy.adminPort", 80)
    body = _set(body, "spec.proxy.backends", [{"name": "a", "url": "http://a:1", "weight": 5}])
    body = _set(body, "spec.autoscaling.minReplicas", 5)
    body = _set(body, "spec.autoscaling.maxReplicas", 4)
    body = _set(body, "spec.autoscaling.intervalSeconds", 1)
    problems = _model_says(body)
    text = "\n".join(problems)
    for expected in ("spec.proxy.port: Input should be greater than or equal to 1024",
                     "spec.proxy.adminPort: Input should be greater than or equal to 1024",
                     "spec.proxy: backends[].weight other than 1 only takes effect",
                     "spec.autoscaling.intervalSeconds: Input should be greater than or equal",
                     "spec.autoscaling: minReplicas must be less than or equal to maxReplicas"):
        assert expected in text, text
    # port == adminPort reads two invalid fields: left to their own errors, not guessed at.
    assert "port and adminPort must differ" not in text
