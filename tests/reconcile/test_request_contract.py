"""Every HTTP request the operator sends (its own client and kopf's) has a shape a real
kube-apiserver v1.36 accepts: unit tests of the checker in apiserver_contract, then the real
operator on kmock through a whole life cycle (and an autoscaling run) with the checker over
the entire request log. kmock itself accepts anything (it served `timeoutSeconds=270.0`)."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from typing import Any

import kmock
import kopf
import pytest
import yarl

from gpuproxy_operator import handlers, kube
from gpuproxy_operator.api.base import GROUP, KIND, PLURAL, VERSION
from gpuproxy_operator.commands import run
from gpuproxy_operator.engine import OperatorState
from tests.autoscaling.conftest import proxy_pods
from tests.autoscaling.proxies import ProxyProcess
from tests.autoscaling.test_autoscaling_operator import NS as SCALE_NS
from tests.autoscaling.test_autoscaling_operator import pods_controller
from tests.reconcile.apiserver_contract import (
    APPLY_PATCH,
    JSON_PATCH,
    MERGE_PATCH,
    STRATEGIC_PATCH,
    field_selector_problems,
    label_selector_problems,
    log_problems,
    parse_path,
    request,
    request_problems,
)
from tests.reconcile.conftest import (
    OPERATOR_AGENTS,
    Cluster,
    Operator,
    VersionedEmulator,
    cluster_body,
    condition,
    eventually,
    secret_body,
)

__all__ = ["pods_controller", "proxy_pods"]  # fixtures reused from tests/autoscaling

CR = f"/apis/{GROUP}/{VERSION}/namespaces/ns1/{PLURAL}"
PODS = "/api/v1/namespaces/ns1/pods"
DEPLOY = "/apis/apps/v1/namespaces/ns1/deployments"
PROMRULE = "/apis/monitoring.coreos.com/v1/namespaces/ns1/prometheusrules"
JSON = "application/json"
WAIT = 40.0  # generous: a loaded 2-core machine


def problems(method: str, url: str, body: Any = None, content_type: str | None = None,
             **headers: str) -> list[str]:
    return request_problems(request(method, url, body, content_type, **headers))


def one(found: list[str], *needles: str) -> None:
    """Exactly the expected problem (and it names what it should)."""
    assert len(found) == 1, found
    for needle in needles:
        assert needle in found[0], found


# --- (a) the checker ------------------------------------------------------------------------

def test_paths_are_parsed_into_resource_targets() -> None:
    t = parse_path(f"{CR}/demo/status")
    assert (t.group, t.version, t.plural, t.namespace, t.name, t.sub) == (
        GROUP, VERSION, PLURAL, "ns1", "demo", "status")
    assert t.is_cluster
    assert t.custom
    t = parse_path("/api/v1/namespaces/ns1")
    assert (t.plural, t.name, t.namespace) == ("namespaces", "ns1", None)
    assert parse_path("/api/v1/watch/namespaces/ns1/pods").watch_path
    assert not parse_path("/apis").is_resource
    assert not parse_path("/apis/apps/v1").is_resource
    assert not parse_path(DEPLOY).custom


def test_float_watch_timeout_is_refused_like_the_real_api_server() -> None:
    """The bug that reached users: kopf sent settings.watching.server_timeout verbatim."""
    one(problems("GET", f"{CR}?watch=true&allowWatchBookmarks=true&resourceVersion=5"
                        "&timeoutSeconds=270.0"),
        "timeoutSeconds='270.0'", 'strconv.ParseInt: parsing "270.0": invalid syntax')
    assert problems("GET", f"{CR}?watch=true&allowWatchBookmarks=true&resourceVersion=5"
                           "&timeoutSeconds=270") == []


@pytest.mark.parametrize("timeout", [300.0, 300, 45.5, 31, 1])
def test_production_settings_send_an_integer_watch_timeout(timeout: float) -> None:
    """handlers.configure as kopf runs it at startup, for the CLI default and odd values; the
    watch URL is built the way kopf builds it (str() of the setting)."""
    settings = kopf.OperatorSettings()
    memo = OperatorState(kube=kube.KubeClient(), inactivity_timeout=timeout)
    handlers.configure(settings=settings, memo=memo)  # type: ignore[call-arg]  # kopf's typing
    value = settings.watching.server_timeout
    url = f"{DEPLOY}?watch=true&resourceVersion=1&timeoutSeconds={value}"
    assert problems("GET", url) == [], value
    assert isinstance(value, int)
    assert 0 < value < max(2, timeout)  # inside kopf's inactivity timeout


@pytest.mark.parametrize(("method", "url"), [
    ("GET", f"{PODS}?limit=500&continue=abc"),
    ("GET", f"{PODS}?limit=-1"),  # int64: a sign is fine for ParseInt
    ("GET", f"{PODS}?timeoutSeconds=30&timeout=45s"),
    ("GET", f"{PODS}/p?resourceVersion=0"),
    ("DELETE", f"{PODS}/p?gracePeriodSeconds=0"),
    ("DELETE", f"{PODS}/p?gracePeriodSeconds=30&propagationPolicy=Foreground"),
])
def test_integer_parameters_that_parse(method: str, url: str) -> None:
    assert problems(method, url) == []


@pytest.mark.parametrize(("method", "url", "needle"), [
    ("GET", f"{PODS}?limit=1e3", "limit='1e3'"),
    ("GET", f"{PODS}?limit=", "limit=''"),
    ("GET", f"{PODS}?watch=true&resourceVersion=1&timeoutSeconds=%2030", "timeoutSeconds"),
    ("DELETE", f"{PODS}/p?gracePeriodSeconds=1.5", "gracePeriodSeconds='1.5'"),
    ("GET", f"{PODS}?limit=9223372036854775808", "int64"),
    ("GET", f"{PODS}?timeout=30", "Go duration"),
])
def test_integer_parameters_that_do_not(method: str, url: str, needle: str) -> None:
    one(problems(method, url), needle)


@pytest.mark.parametrize("value", ["true", "false", "1", "0", "True"])
def test_boolean_parameters_that_parse(value: str) -> None:
    assert problems("GET", f"{PODS}?watch=true&allowWatchBookmarks={value}"
                           "&resourceVersion=1") == []
    assert problems("GET", f"{PODS}?watch={value}&resourceVersion=1&pretty={value}") == []


@pytest.mark.parametrize(("value", "read_as"), [("yes", "true"), ("no", "true"), ("", "true"),
                                                ("off", "true")])
def test_boolean_parameters_that_do_not(value: str, read_as: str) -> None:
    found = problems("GET", f"{PODS}?resourceVersion=1&watch=true&allowWatchBookmarks={value}")
    one(found, "allowWatchBookmarks", f"reads it as {read_as}")


def test_resource_versions_and_continue_tokens_are_opaque_strings() -> None:
    assert problems("GET", f"{PODS}?watch=true&resourceVersion=...") == []
    assert problems("GET", f"{PODS}?limit=5&continue=eyJ2IjoibWV0YS5rOHMuaW8vdjEifQ") == []
    assert problems("GET", f"{PODS}/p?resourceVersion=not-a-number") == []


@pytest.mark.parametrize(("url", "needle"), [
    (f"{PODS}?resourceVersionMatch=NotOlderThan", "unless resourceVersion is provided"),
    (f"{PODS}?resourceVersion=0&resourceVersionMatch=Exact", 'Exact is forbidden for'),
    (f"{PODS}?resourceVersion=5&resourceVersionMatch=Latest", "not one of"),
    (f"{PODS}?resourceVersion=5&continue=x", "not allowed together with continue"),
    (f"{PODS}?sendInitialEvents=true", "forbidden for list"),
    (f"{PODS}?allowWatchBookmarks=true", "without watch=true"),
    (f"{PODS}?watch=true&resourceVersionMatch=NotOlderThan", "unless sendInitialEvents"),
    (f"{PODS}?watch=true&sendInitialEvents=true", "requires resourceVersionMatch"),
    (f"{PODS}?watch=true&resourceVersion=1&limit=5", "not supported on a watch"),
])
def test_resource_version_match_and_watch_only_options(url: str, needle: str) -> None:
    one(problems("GET", url), needle)


def test_resource_version_match_where_it_is_allowed() -> None:
    assert problems("GET", f"{PODS}?resourceVersion=5&resourceVersionMatch=NotOlderThan") == []
    assert problems("GET", f"{PODS}?resourceVersion=5&resourceVersionMatch=Exact") == []
    assert problems("GET", f"{PODS}?watch=true&sendInitialEvents=true"
                           "&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true") == []


@pytest.mark.parametrize(("method", "url", "name"), [
    ("GET", f"{PODS}?labelselector=a%3Db", "labelselector"),  # a typo: silently everything
    ("GET", f"{PODS}/p?labelSelector=a", "labelSelector"),  # not a get option
    ("POST", f"{PODS}?timeoutSeconds=5", "timeoutSeconds"),
    ("PATCH", f"{PODS}/p?propagationPolicy=Background", "propagationPolicy"),
    ("DELETE", f"{PODS}/p?fieldManager=x", "fieldManager"),
    ("GET", f"{PODS}?watch=true&resourceVersion=1&timeout=30s", "timeout"),
    ("GET", "/apis?limit=5", "limit"),
])
def test_unknown_query_parameters_for_the_verb(method: str, url: str, name: str) -> None:
    body = {"metadata": {"name": "p"}} if method in ("POST", "PATCH") else None
    ctype = JSON if method == "POST" else MERGE_PATCH if method == "PATCH" else None
    one(problems(method, url, body, ctype), f"{name!r} is not a query parameter")


def test_field_manager_and_field_validation() -> None:
    body = {"metadata": {"labels": {"a": "b"}}}
    assert problems("PATCH", f"{PODS}/p?fieldManager=gpuproxy-operator&fieldValidation=Strict",
                    body, MERGE_PATCH) == []
    assert problems("PATCH", f"{PODS}/p?fieldManager={'m' * 128}", body, MERGE_PATCH) == []
    one(problems("PATCH", f"{PODS}/p?fieldManager={'m' * 129}", body, MERGE_PATCH),
        "129 bytes")
    one(problems("PATCH", f"{PODS}/p?fieldManager=a%07b", body, MERGE_PATCH), "printable")
    one(problems("PATCH", f"{PODS}/p?fieldManager=op%C3%A9rateur", body, MERGE_PATCH),
        "printable ASCII")
    one(problems("PATCH", f"{PODS}/p?fieldValidation=strict", body, MERGE_PATCH),
        "Ignore, Warn, Strict")
    one(problems("PATCH", f"{PODS}/p?dryRun=true", body, MERGE_PATCH), "dryRun")
    apply = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}}
    assert problems("PATCH", f"{PODS}/p?fieldManager=gpuproxy&force=true", apply,
                    APPLY_PATCH) == []
    one(problems("PATCH", f"{PODS}/p", apply, APPLY_PATCH), "without fieldManager")
    one(problems("PATCH", f"{PODS}/p?force=true", body, MERGE_PATCH), "only for apply")


@pytest.mark.parametrize(("method", "url", "ctype"), [
    ("POST", PODS, JSON), ("POST", PODS, "application/json; charset=utf-8"),
    ("POST", PODS, "application/yaml"), ("POST", PODS, "application/vnd.kubernetes.protobuf"),
    ("POST", PODS, None),  # the server assumes JSON
    ("PUT", f"{PODS}/p", JSON), ("POST", CR, JSON),
    ("PATCH", f"{PODS}/p", JSON_PATCH), ("PATCH", f"{PODS}/p", MERGE_PATCH),
    ("PATCH", f"{PODS}/p", STRATEGIC_PATCH), ("PATCH", f"{DEPLOY}/d", STRATEGIC_PATCH),
    ("PATCH", f"{CR}/demo", JSON_PATCH), ("PATCH", f"{CR}/demo", MERGE_PATCH),
    ("DELETE", f"{PODS}/p", JSON),
])
def test_content_types_the_server_takes(method: str, url: str, ctype: str | None) -> None:
    if ctype == JSON_PATCH:
        body: Any = [{"op": "add", "path": "/metadata/labels/a", "value": "b"}]
    elif method == "DELETE":
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
    elif method in ("PATCH",):
        body = {"metadata": {"labels": {"a": "b"}}}
    else:
        group, version = parse_path(url).group, parse_path(url).version
        body = {"apiVersion": f"{group}/{version}" if group else version,
                "kind": KIND if group == GROUP else "Pod", "metadata": {"name": "p"}}
    raw = None if ctype and "protobuf" in ctype else body
    found = problems(method, url, raw if raw is not None else b"\x0a\x02v1", ctype)
    assert found == [], found


@pytest.mark.parametrize(("method", "url", "ctype", "needle"), [
    ("DELETE", f"{PODS}/p", "text/plain; charset=utf-8", "415"),  # the other bug kmock took
    ("DELETE", f"{PODS}/p", "application/x-www-form-urlencoded", "415"),
    ("POST", PODS, "text/plain", "415"),
    ("POST", CR, "application/vnd.kubernetes.protobuf", "415"),
    ("PATCH", f"{CR}/demo", STRATEGIC_PATCH, "strategic merge is for built-in kinds"),
    ("PATCH", f"{PROMRULE}/r", STRATEGIC_PATCH, "custom resource"),
    ("PATCH", f"{PODS}/p", JSON, "415"),
    ("PATCH", f"{PODS}/p", None, "415"),
])
def test_content_types_the_server_refuses(method: str, url: str, ctype: str | None,
                                          needle: str) -> None:
    body = {"kind": "DeleteOptions", "apiVersion": "v1"} if method == "DELETE" else (
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}} if method == "POST"
        else {"metadata": {"labels": {"a": "b"}}})
    if url.startswith(CR) and method == "POST":
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {"name": "p"}}
    one(problems(method, url, body, ctype), needle)


def test_bodies_parse_as_what_they_declare() -> None:
    one(problems("POST", PODS, "{not json", JSON), "not valid JSON")
    one(problems("PATCH", f"{PODS}/p", "{'a': 1}", MERGE_PATCH), "not valid JSON")
    one(problems("PATCH", f"{PODS}/p", {"op": "add"}, JSON_PATCH), "list of operations")
    one(problems("PATCH", f"{PODS}/p", [{"op": "add", "path": "/a"}], JSON_PATCH), "lacks a value")
    one(problems("PATCH", f"{PODS}/p", [1, 2], MERGE_PATCH), "must be an object")
    one(problems("POST", PODS, None, JSON), "without a body")
    one(problems("DELETE", f"{PODS}/p", {"propagationPolicy": "Cascade"}, JSON), "Cascade")
    one(problems("DELETE", f"{PODS}/p", {"gracePeriodSeconds": 1.5}, JSON), "not an integer")
    assert problems("DELETE", f"{PODS}/p") == []  # no body at all is fine
    one(problems("POST", PODS, {"apiVersion": "apps/v1", "kind": "Pod",
                                "metadata": {"name": "p"}}, JSON), "does not match the URL")
    one(problems("POST", PODS, {"metadata": {"name": "p", "namespace": "other"}}, JSON),
        "metadata.namespace 'other'")
    one(problems("POST", CR, {"metadata": {"name": "p"}}, JSON), "lacks apiVersion/kind")
    one(problems("POST", PODS, {"metadata": {}}, JSON), "generateName")
    assert problems("POST", "/api/v1/namespaces/ns1/events",
                    {"metadata": {"generateName": "kopf-event-"}, "reason": "x"}, JSON) == []


GOOD_LABEL_SELECTORS = [
    "", "a=b", "a==b", "a!=b", "a in (x,y)", "a notin (x)", "a", "!a", "a=", "x>5", "x<-1",
    "gpuproxy.aiserve.farm/cluster", "gpuproxy.aiserve.farm/cluster=demo,app.kubernetes.io/"
    "component=proxy", " a = b , c in ( x , y ) , !d ", "a in (x,)", f"a={'v' * 63}",
    "k_8.s-x=V_1.2-3",
]
BAD_LABEL_SELECTORS = [
    "a=b=c", "a in ()", "a in (x", "a in x", "-a=b", "a=b,", ",a", "a/b/c=d", "Foo.COM/a=b",
    f"a={'v' * 64}", "a==-b", "a>b", "a b", "!a=b", "a=(b)", f"{'k' * 64}=v", "/a=b", "a in (x y)",
]


@pytest.mark.parametrize("selector", GOOD_LABEL_SELECTORS)
def test_label_selectors_that_parse(selector: str) -> None:
    assert label_selector_problems(selector) == []


@pytest.mark.parametrize("selector", BAD_LABEL_SELECTORS)
def test_label_selectors_that_do_not(selector: str) -> None:
    assert label_selector_problems(selector), selector
    found = request_problems(request("GET", str(yarl.URL(PODS).with_query(
        labelSelector=selector))))
    assert any("labelSelector" in p and "HTTP 400" in p for p in found), found


@pytest.mark.parametrize("selector", [
    "", "metadata.name=demo", "metadata.namespace!=x", "involvedObject.name==foo",
    "metadata.name=a\\,b", "metadata.name=a,metadata.namespace=b", "status.phase=Running",
])
def test_field_selectors_that_parse(selector: str) -> None:
    assert field_selector_problems(selector) == []


@pytest.mark.parametrize("selector", [
    "metadata.name", "name=demo", "metadata.name=a,b=c", "metadata.name=a\\x",
    "metadata.name=a=b", "metadata.name=a\\", "=x",
])
def test_field_selectors_that_do_not(selector: str) -> None:
    assert field_selector_problems(selector), selector


def test_custom_resources_select_on_metadata_fields_only() -> None:
    assert field_selector_problems("metadata.name=demo", custom=True) == []
    assert field_selector_problems("spec.paused=true", custom=True)
    assert field_selector_problems("spec.paused=true", custom=False) == []
    assert problems("GET", f"{CR}?fieldSelector=metadata.name%3Ddemo") == []
    one(problems("GET", f"{CR}?fieldSelector=spec.paused%3Dtrue"), "fieldSelector",
        "custom resource")
    assert problems("GET", f"{PODS}?fieldSelector=spec.nodeName%3Dn1") == []


def test_the_deprecated_watch_path_is_a_watch() -> None:
    url = "/api/v1/watch/namespaces/ns1/pods?resourceVersion=5&allowWatchBookmarks=true"
    assert problems("GET", url) == []
    assert log_problems([request("GET", url, User_Agent="kopf/1.45.2")],
                        agents=OPERATOR_AGENTS) == []
    found = log_problems([request("GET", "/api/v1/watch/namespaces/ns1/pods",
                                  User_Agent="kopf/1.45.2")], agents=OPERATOR_AGENTS)
    one(found, "without resourceVersion")


def test_cluster_main_resource_takes_metadata_only() -> None:
    meta = {"metadata": {"annotations": {f"{GROUP}/last-handled-configuration": "{}"}}}
    assert problems("PATCH", f"{CR}/demo", meta, MERGE_PATCH) == []
    kopf_finalizer = [{"op": "test", "path": "/metadata/resourceVersion", "value": "7"},
                      {"op": "add", "path": "/metadata/finalizers/-", "value": "x"}]
    assert problems("PATCH", f"{CR}/demo", kopf_finalizer, JSON_PATCH) == []
    one(problems("PATCH", f"{CR}/demo", {"spec": {"paused": True}}, MERGE_PATCH),
        "changes spec of a GpuProxyCluster")
    one(problems("PATCH", f"{CR}/demo", {"status": {"phase": "Ready"}}, MERGE_PATCH),
        "ignored by the main resource")
    one(problems("PATCH", f"{CR}/demo", [{"op": "replace", "path": "/spec/proxy/replicas",
                                          "value": 3}], JSON_PATCH), "changes spec")
    assert problems("PUT", f"{CR}/demo", {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
                                          "metadata": {"name": "demo"}}, JSON)


def test_cluster_status_takes_status_only_and_conditions_need_a_resource_version() -> None:
    url = f"{CR}/demo/status"
    conditions = [{"type": "Ready", "status": "True"}]
    assert problems("PATCH", url, {"status": {"phase": "Ready", "replicas": 2}},
                    MERGE_PATCH) == []
    assert problems("PATCH", url, {"status": {"conditions": conditions},
                                   "metadata": {"resourceVersion": "17"}}, MERGE_PATCH) == []
    one(problems("PATCH", url, {"status": {"conditions": conditions}}, MERGE_PATCH),
        "without a resourceVersion precondition")
    one(problems("PATCH", url, {"status": {"conditions": conditions},
                                "metadata": {"resourceVersion": ""}}, MERGE_PATCH),
        "precondition")
    one(problems("PATCH", url, {"spec": {"paused": True}, "status": {}}, MERGE_PATCH),
        "sets spec: ignored")
    one(problems("PATCH", url, {"metadata": {"labels": {"a": "b"}}, "status": {}}, MERGE_PATCH),
        "metadata labels")
    one(problems("PATCH", url, [{"op": "replace", "path": "/status/conditions",
                                 "value": conditions}], JSON_PATCH), "test of /metadata")
    assert problems("PATCH", url, [
        {"op": "test", "path": "/metadata/resourceVersion", "value": "3"},
        {"op": "replace", "path": "/status/conditions", "value": conditions}], JSON_PATCH) == []
    # Other kinds' conditions are not this rule's business (no concurrent writer we know of).
    assert problems("PATCH", f"{DEPLOY}/d/status", {"status": {"conditions": conditions}},
                    MERGE_PATCH) == []


def test_replicas_go_through_scale_and_not_from_the_operator() -> None:
    one(problems("PATCH", f"{CR}/demo/scale", {"spec": {"replicas": 3}}, MERGE_PATCH),
        "writes the GpuProxyCluster's /scale")
    assert problems("PATCH", f"{DEPLOY}/d/scale", {"spec": {"replicas": 3}}, MERGE_PATCH) == []
    found = problems("PATCH", f"{DEPLOY}/d/scale", {"spec": {"replicas": -1, "x": 1}},
                     MERGE_PATCH)
    assert len(found) == 2, found
    # The autoscaler scales the proxy Deployment's main resource: fine.
    assert problems("PATCH", f"{DEPLOY}/d", {"spec": {"replicas": 3}}, MERGE_PATCH) == []
    # A Deployment's status is not written through its main resource.
    one(problems("POST", DEPLOY, {"apiVersion": "apps/v1", "kind": "Deployment",
                                  "metadata": {"name": "d"}, "status": {"replicas": 1}}, JSON),
        "carries status")


def test_log_checks_only_the_given_agents_and_that_watches_resume() -> None:
    kopf_agent = {"User_Agent": "kopf/1.45.2"}
    log = [
        request("GET", f"{PODS}?watch=true&resourceVersion=5&timeoutSeconds=270", **kopf_agent),
        request("GET", f"{PODS}?watch=true&timeoutSeconds=270", **kopf_agent),
        request("GET", f"{PODS}?watch=true&sendInitialEvents=true"
                       "&resourceVersionMatch=NotOlderThan", **kopf_agent),
        request("GET", f"{PODS}?watch=true&timeoutSeconds=1.5", User_Agent="kubectl/v1.36"),
        request("DELETE", f"{PODS}/p", "{}", "text/plain", User_Agent="gpuproxy-operator"),
    ]
    found = log_problems(log, agents=OPERATOR_AGENTS)
    assert len(found) == 2, found
    assert "without resourceVersion" in found[0]
    assert "[kopf/1.45.2]" in found[0]
    assert found[1].startswith(f"DELETE {PODS}/p [gpuproxy-operator]: ")
    assert "415" in found[1]


# --- (b) the real operator on kmock, the whole request log ----------------------------------

class ScaleSubresource(VersionedEmulator):
    """kmock plus the GpuProxyCluster's scale subresource as the real API server serves it
    (specReplicasPath .spec.proxy.replicas, which bumps the generation like any spec write);
    kmock alone would merge the Scale's spec.replicas into the cluster's spec."""

    async def _handle(self, request: Any) -> Any:
        res = request.resource
        if (request.subresource == "scale" and res is not None
                and (res.group, res.plural) == (GROUP, PLURAL)
                and request.action == kmock.action.UPDATE and isinstance(request.data, dict)):
            for (resource, ns, name), obj in self.objects.items():
                if ((resource.group, resource.plural, ns, name)
                        == (GROUP, PLURAL, request.namespace, request.name) and not obj.deleted):
                    spec = dict(obj.raw)["spec"]
                    proxy = {**spec["proxy"], "replicas": request.data["spec"]["replicas"]}
                    gen = dict(obj.raw)["metadata"].get("generation", 1) + 1
                    # In place: the log keeps the bytes as sent (`.body`), and kmock then
                    # serves the write like any other patch of the object.
                    request.data.clear()
                    request.data.update({"spec": {"proxy": proxy},
                                         "metadata": {"generation": gen}})
                    break
        return await super()._handle(request)


@pytest.fixture
async def api_server() -> AsyncIterator[Any]:
    """Overrides the harness' api_server (cluster and operator build on it)."""
    async with ScaleSubresource() as server, kmock.Server(server):
        yield server


@pytest.fixture
def production_defaults(monkeypatch: pytest.MonkeyPatch) -> float:
    """The CLI's default watch inactivity timeout (what `gpuproxy-operator run` passes)."""
    monkeypatch.delenv("GPUPROXY_WATCH_INACTIVITY_TIMEOUT", raising=False)
    parser = argparse.ArgumentParser()
    run.add_arguments(parser)
    return float(parser.parse_args([]).watch_inactivity_timeout)


async def scale(cluster: Cluster, namespace: str, name: str, replicas: int) -> None:
    """`kubectl scale gpc NAME --replicas N`: a merge patch of the scale subresource."""
    path = cluster.path(KIND, namespace, name) + "/scale"
    async with cluster.server.patch(path, json={"spec": {"replicas": replicas}},
                                    headers={"Content-Type": MERGE_PATCH}) as resp:
        assert resp.status < 400, await resp.text()


def cr(cluster: Cluster, namespace: str = "ns1") -> dict[str, Any] | None:
    return cluster.find(KIND, namespace, "demo")


def ready(cluster: Cluster, generation: int | None = None, namespace: str = "ns1") -> bool:
    cond = condition(cr(cluster, namespace), "Ready")
    return cond.get("status") == "True" and (
        generation is None or cond.get("observedGeneration") == generation)


def kinds(cluster: Cluster, uid: str) -> set[str]:
    return {kind for kind, _ in cluster.children("ns1", uid)}


def operator_requests(cluster: Cluster) -> list[Any]:
    return [r for r in list(cluster.server)
            if (r.headers.get("User-Agent") or "").startswith(OPERATOR_AGENTS)]


def assert_exercised(requests: list[Any], expected: set[tuple[str, str, str]]) -> None:
    """The log holds the kinds of request the contract is about (no vacuous pass)."""
    seen = set()
    for r in requests:
        agent = "kopf" if r.headers.get("User-Agent", "").startswith("kopf/") else "ours"
        target = parse_path(r.url.path)
        what = "watch" if "watch=true" in r.url.query_string else (target.sub or "main")
        seen.add((agent, r.method.value, what))
    assert expected <= seen, sorted(expected - seen)


async def test_whole_life_cycle_sends_only_requests_a_real_api_server_accepts(
        cluster: Cluster, operator: Operator, production_defaults: float) -> None:
    assert handlers.load_autoscaling()  # as `gpuproxy-operator run` does
    body = cluster_body(monitoring={"prometheusRule": {"enabled": True},
                                    "serviceMonitor": {"enabled": True}})
    await cluster.create(secret_body("ns1"))
    await cluster.create(body)
    state = await operator.start()
    # The Operator helper leaves inactivity_timeout at its default: the CLI's, so kopf runs
    # handlers.configure with the production watch settings.
    assert state.inactivity_timeout == production_defaults == 300.0
    await eventually(lambda: ready(cluster, 1), WAIT)
    uid = body["metadata"]["uid"]
    assert {"PrometheusRule", "ServiceMonitor"} <= kinds(cluster, uid)

    # Drift: a deleted child comes back, an edited one is reverted.
    await cluster.delete("ConfigMap", "ns1", "demo-proxy")
    await eventually(lambda: cluster.find("ConfigMap", "ns1", "demo-proxy") is not None, WAIT)
    await cluster.patch("Deployment", "ns1", "demo-pgbouncer", {"spec": {"template": {"spec": {
        "containers": [{"name": "pgbouncer", "image": "evil:latest"}]}}}})
    await eventually(lambda: "evil:latest" not in str(
        cluster.get("Deployment", "ns1", "demo-pgbouncer")["spec"]), WAIT)

    # A spec change that patches children and deletes the alert rules.
    await cluster.edit_spec("ns1", "demo", {
        "proxy": {**body["spec"]["proxy"], "loadBalancing": {"strategy": "round_robin"}},
        "monitoring": {"prometheusRule": {"enabled": False}, "serviceMonitor": {"enabled": True}}})
    await eventually(lambda: "PrometheusRule" not in kinds(cluster, uid), WAIT)
    await eventually(lambda: ready(cluster, 2), WAIT)

    # `kubectl scale` through the scale subresource.
    await scale(cluster, "ns1", "demo", 3)
    await eventually(lambda: cluster.get("Deployment", "ns1", "demo-proxy")["spec"]["replicas"]
                     == 3, WAIT)
    await eventually(lambda: (cr(cluster) or {}).get("status", {}).get("replicas") == 3, WAIT)

    # Pause (changes withheld), unpause (applied).
    await cluster.edit_spec("ns1", "demo", {"paused": True})
    await eventually(lambda: condition(cr(cluster), "Paused").get("status") == "True", WAIT)
    await cluster.delete("Service", "ns1", "demo-redis")
    await cluster.edit_spec("ns1", "demo", {"paused": False})
    await eventually(lambda: cluster.find("Service", "ns1", "demo-redis") is not None, WAIT)
    await eventually(lambda: ready(cluster, 5), WAIT)

    # Delete: children go by (fake) garbage collection; the operator keeps resyncing.
    await cluster.delete(KIND, "ns1", "demo")
    await eventually(lambda: cluster.children("ns1", uid) == {}, WAIT)
    mark = cluster.mark()
    cr_list = kube.CLUSTER.path(None)
    await eventually(lambda: sum(1 for r in list(cluster.server)[mark:]
                                 if r.url.path == cr_list and r.method.value == "GET") >= 2, WAIT)
    await operator.stop()

    requests = operator_requests(cluster)
    assert_exercised(requests, {
        ("kopf", "GET", "watch"), ("kopf", "PATCH", "main"), ("ours", "GET", "main"),
        ("ours", "POST", "main"), ("ours", "PATCH", "main"), ("ours", "DELETE", "main"),
        ("ours", "PATCH", "status"),
    })
    watches = [r for r in requests if "watch=true" in r.url.query_string]
    assert all("timeoutSeconds" in r.url.query for r in watches), watches
    found = log_problems(requests, agents=OPERATOR_AGENTS)
    assert not found, "\n".join(found)


def autoscaler_steps(cluster: Cluster) -> int:
    """Steps of ClusterScaler.step: each reads the proxy Deployment (reconcile lists it). Its
    status patches are no count of steps: it writes only on a significant change."""
    path = cluster.path("Deployment", SCALE_NS, "demo-proxy")
    return sum(1 for r in operator_requests(cluster)
               if r.url.path == path and r.method.value == "GET")


async def test_autoscaling_sends_only_requests_a_real_api_server_accepts(
        cluster: Cluster, operator: Operator, pods_controller: None,
        proxy_pods: list[ProxyProcess], production_defaults: float) -> None:
    """A few autoscaler steps (scale up on real connections), then pause: the autoscaler's
    status patches replace the conditions list, so they need a resourceVersion precondition."""
    assert handlers.load_autoscaling()
    body = cluster_body("demo", SCALE_NS, proxy={
        "replicas": 1, "adminPort": proxy_pods[0].admin_port, "connectionsPerReplica": 100,
        "backends": [{"name": "vllm-0", "url": "http://vllm-0.gpu.svc:8000"}]})
    body["spec"]["autoscaling"] = {"enabled": True, "minReplicas": 1, "maxReplicas": 4,
                                   "targetConnections": 400, "intervalSeconds": 5}
    for pod in proxy_pods:
        pod.close_clients()
    proxy_pods[0].open_clients(200)  # 200 / 80 per replica -> 3
    try:
        await asyncio.to_thread(proxy_pods[0].wait_for_connections, 200)
        await cluster.create(secret_body(SCALE_NS))
        await cluster.create(body)
        state = await operator.start()
        assert state.inactivity_timeout == production_defaults
        await eventually(lambda: (cluster.find("Deployment", SCALE_NS, "demo-proxy") or {}).get(
            "spec", {}).get("replicas") == 3, WAIT)
        await eventually(lambda: any(e["reason"] == "ScaledUp" for e in cluster.events(SCALE_NS)),
                         WAIT)
        await eventually(lambda: autoscaler_steps(cluster) >= 3, WAIT)
        await cluster.edit_spec(SCALE_NS, "demo", {"paused": True})
        await eventually(lambda: condition(cr(cluster, SCALE_NS), "Scaling").get("reason")
                         == "Paused", WAIT)
        await operator.stop()
    finally:
        proxy_pods[0].close_clients()

    requests = operator_requests(cluster)
    assert any(r.url.path == cluster.path("Deployment", SCALE_NS, "demo-proxy")
               and r.method.value == "PATCH" for r in requests)
    found = log_problems(requests, agents=OPERATOR_AGENTS)
    others = [p for p in found if "resourceVersion precondition" not in p]
    assert not others, "\n".join(others)
    # The autoscaler's status patches (ClusterScaler.step and _report_inactive, through
    # KubeScaling.patch_status) replace the whole conditions list: without a resourceVersion
    # precondition they can wipe reconcile's newer conditions (and vice versa is guarded).
    assert not found, "\n".join(found)
