"""The chart's RBAC grants exactly what the operator uses, derived from its code: kopf's handler
registry (what the framework watches and patches) and the API calls the reconcile engine and the
autoscaler make, recorded on an in-memory API. Less fails (the operator breaks), more fails
(least privilege), and wildcards fail."""

from __future__ import annotations

import asyncio
import base64
import copy
import functools
import json
import logging
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import pytest
from tests.chart.helm import (
    CLUSTER_VALUES,
    NAMESPACE,
    NAMESPACED_VALUES,
    by_kind,
    load_yaml,
    render,
)

from gpuproxy_operator import engine, handlers, kube
from gpuproxy_operator.api.base import GROUP, KIND, PLURAL
from gpuproxy_operator.api.cluster import parse_cluster
from gpuproxy_operator.autoscaling.kube_adapter import KubeScaling
from gpuproxy_operator.builders import BuildInputs, DatabaseCredentials, build_all
from gpuproxy_operator.leader import LeaderElector, LeaseConfig
from gpuproxy_operator.naming import child_name

Grant = tuple[str, str, str]  # (apiGroup, resource, verb)
NS = "team-a"

# What kopf itself does beyond the handlers it runs, per kopf 1.45 (kopf/_core/reactor/
# observation.py, posting.py, progress storage). The handler-derived part is computed below.
KOPF_CLUSTER_SCOPED: set[Grant] = {
    # resource_observer: a watch on CRDs to notice served resources appear/disappear.
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
}
KOPF_NAMESPACE_OBSERVER: set[Grant] = {
    # namespace_observer: only when not cluster-wide, to follow the watched namespaces.
    ("", "namespaces", "list"),
    ("", "namespaces", "watch"),
}
KOPF_EVENTS: set[Grant] = {("", "events", "create")}  # k8s event posting (settings.posting)
# Not an API call: children carry ownerReferences with blockOwnerDeletion, which the
# OwnerReferencesPermissionEnforcement admission plugin (e.g. OpenShift) only allows to someone
# who may update the owner's finalizers.
OWNER_FINALIZERS: set[Grant] = {(GROUP, f"{PLURAL}/finalizers", "update")}


@dataclass
class RecordingKube(kube.KubeClient):
    """An in-memory API server behind the operator's own client, recording every call as
    (apiGroup, resource[/subresource], verb)."""

    calls: set[Grant] = field(default_factory=set)
    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    serial: int = 0

    async def request(self, verb: str, kind: kube.ResourceKind, namespace: str | None,
                      name: str | None = None, *, sub: str | None = None, body: Any = None,
                      params: dict[str, str] | None = None) -> Any:
        self.calls.add((kind.group, kind.plural + (f"/{sub}" if sub else ""), verb))
        ns = namespace or ""
        if verb == "list":
            return {"items": [copy.deepcopy(o) for (p, n, _), o in self.objects.items()
                              if p == kind.plural and n == ns]}
        if verb == "create":
            name = body["metadata"]["name"]
        assert name is not None
        key = (kind.plural, ns, name)
        if verb == "create":
            if key in self.objects:
                raise kube.Conflict(verb, name, 409, "already exists")
            self.serial += 1
            stored = copy.deepcopy(body)
            stored["metadata"].update(uid=f"uid-{self.serial}", resourceVersion=str(self.serial))
            self.objects[key] = stored
            return copy.deepcopy(stored)
        if key not in self.objects:
            raise kube.NotFound(verb, name, 404, "not found")
        if verb == "get":
            return copy.deepcopy(self.objects[key])
        if verb == "patch":
            self.objects[key] = _merge(self.objects[key], body)
            return copy.deepcopy(self.objects[key])
        if verb == "delete":
            del self.objects[key]
            return {}
        raise AssertionError(f"unexpected verb {verb}")

    def put(self, obj: dict[str, Any]) -> None:
        kind = kube.REGISTRY[obj["kind"]]
        meta = obj["metadata"]
        self.objects[(kind.plural, meta.get("namespace", ""), meta["name"])] = obj


def _merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge(out.get(key), value)
    return out


def full_cluster_body(generation: int = 1) -> dict[str, Any]:
    """The chart's full-featured cluster (ci/cluster-values.yaml): every component on."""
    spec = copy.deepcopy(load_yaml(CLUSTER_VALUES)["cluster"]["spec"])
    return {
        "apiVersion": f"{GROUP}/v1alpha1",
        "kind": KIND,
        "metadata": {"name": "prod", "namespace": NS, "uid": "uid-prod",
                     "generation": generation, "resourceVersion": "1"},
        "spec": spec,
    }


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def db_secret() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "gpuproxy-db", "namespace": NS},
            "data": {"username": _b64("gpuproxy"), "password": _b64("pw")}}


async def _exercise_operator() -> set[Grant]:
    """Drive the engine and the autoscaler through create, change, removal of components,
    name conflicts and scaling; return every call they made."""
    log = logging.getLogger("rbac-test")
    api = RecordingKube()
    state = engine.OperatorState(kube=api, namespaces=(NS,))
    api.put(db_secret())
    api.put(full_cluster_body())
    outcome = await engine.reconcile_cluster(state, (NS, "prod"), log)
    assert outcome.result == "changed", outcome.message

    # Change everything that can change: patches, and deletions of switched-off components.
    body = api.objects[(PLURAL, NS, "prod")]
    spec = body["spec"]
    spec["proxy"]["workers"] = 8
    spec["proxy"]["podDisruptionBudget"] = {"enabled": False}
    spec["redis"] = {"mode": "external", "url": "redis://redis.cache.svc:6379"}
    spec["nodeTuning"] = {"enabled": False}
    spec["monitoring"] = {"prometheusRule": {"enabled": False},
                          "serviceMonitor": {"enabled": False}}
    body["metadata"]["generation"] = 2
    outcome = await engine.reconcile_cluster(state, (NS, "prod"), log)
    assert outcome.result == "changed", outcome.message

    # A second cluster whose children's names are all taken by foreign objects: the engine
    # reads each one to see whether it owns it.
    other = full_cluster_body()
    other["metadata"].update(name="taken", uid="uid-taken")
    api.put(other)
    for manifest in build_all(parse_cluster(other), BuildInputs(DatabaseCredentials("u", "p"))):
        foreign = copy.deepcopy(manifest)
        foreign["metadata"] = {"name": manifest["metadata"]["name"], "namespace": NS}
        api.put(foreign)
    outcome = await engine.reconcile_cluster(state, (NS, "taken"), log)
    assert outcome.result == "degraded", outcome.message

    # The autoscaler's calls, through the adapter the scaling loop uses.
    scaling = KubeScaling(api)
    proxy = child_name("prod", "proxy")
    assert await scaling.get_deployment(NS, proxy) is not None
    await scaling.list_proxy_pods(NS, "prod")
    api.put({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{proxy}-0",
                                                             "namespace": NS}})
    await scaling.set_deletion_cost(NS, f"{proxy}-0", 7)  # before a scale-down
    await scaling.list_autoscalers(NS)
    await scaling.set_replicas(NS, proxy, 4)
    assert await scaling.get_cluster(NS, "prod") is not None
    await scaling.patch_status(NS, "prod", {"desiredReplicas": 4}, None)
    await scaling.post_event(body, "Normal", "Scaled", "test")

    # The periodic resync lists the clusters of each watched namespace.
    await handlers.resync_once(state)

    # Leader election: the first replica creates the Lease and renews it, releases it on its
    # way out; the next one reads it and takes it over.
    first = LeaderElector(api, LeaseConfig(namespace=NS, identity="op-0"))
    assert await first.try_acquire_or_renew()
    assert await first.try_acquire_or_renew()
    await first.release()
    assert await LeaderElector(api, LeaseConfig(namespace=NS, identity="op-1")
                               ).try_acquire_or_renew()
    return api.calls


@pytest.fixture(scope="module")
def code_calls() -> set[Grant]:
    return asyncio.run(_exercise_operator())


# Runs in a subprocess: importing the autoscaler's handlers registers them in kopf's global
# registry, which must not leak into other tests of this process.
KOPF_REGISTRY_DUMP = """
import json, kopf
from gpuproxy_operator import handlers
handlers.load_autoscaling()
registry = kopf.get_default_registry()
def dump(handlers):
    return [[h.selector.group, h.selector.plural or h.selector.any_name] for h in handlers]
print(json.dumps({
    "watched": dump([*registry._watching.get_all_handlers(),
                     *registry._changing.get_all_handlers(),
                     *registry._spawning.get_all_handlers(),
                     *registry._indexing.get_all_handlers()]),
    "changing": dump(registry._changing.get_all_handlers()),
}))
"""


def _resource_of(group: str, name: str) -> tuple[str, str]:
    for res in kube.REGISTRY.values():
        if res.group == group and name in (res.plural, res.kind):
            return res.group, res.plural
    raise AssertionError(f"kopf watches {group}/{name}, which kube.REGISTRY does not know")


@functools.cache
def kopf_needs() -> frozenset[Grant]:
    """From kopf's handler registry: every watched resource needs list+watch; resources with
    create/update/resume handlers are patched (progress and diff-base annotations)."""
    proc = subprocess.run([sys.executable, "-c", KOPF_REGISTRY_DUMP], capture_output=True,
                          text=True, timeout=60, check=True)
    dump = json.loads(proc.stdout)
    needs: set[Grant] = set()
    for group, name in dump["watched"]:
        group, plural = _resource_of(group, name)
        needs |= {(group, plural, "list"), (group, plural, "watch")}
    for group, name in dump["changing"]:
        needs.add((*_resource_of(group, name), "patch"))
    return frozenset(needs)


def child_resources() -> set[tuple[str, str]]:
    """Every kind the builders emit for a full-featured cluster, plus every kind reconcile
    observes (it must list them to delete leftovers)."""
    built = build_all(parse_cluster(full_cluster_body()),
                      BuildInputs(DatabaseCredentials("gpuproxy", "pw")))
    kinds = {m["kind"] for m in built} | set(kube.CHILD_KINDS)
    assert {m["kind"] for m in built} <= set(kube.CHILD_KINDS), "a built kind is not observed"
    assert not {m["kind"] for m in built} & set(kube.CLEANUP_ONLY_KINDS), "built, not cleanup"
    return {(kube.REGISTRY[k].group, kube.REGISTRY[k].plural) for k in kinds
            if k not in kube.CLEANUP_ONLY_KINDS}


def escalation_needs() -> set[Grant]:
    """What the Roles the operator builds grant (the proxy's, for backend discovery): the API
    server lets it create a Role only with those permissions of its own."""
    built = build_all(parse_cluster(full_cluster_body()),
                      BuildInputs(DatabaseCredentials("gpuproxy", "pw")))
    roles = [m for m in built if m["kind"] == "Role"]
    assert roles, "the full cluster builds no Role: the chart's escalation grants go untested"
    return grants(roles)


def cleanup_only_needs() -> set[Grant]:
    """Kinds reconcile only observes and deletes (left over from older operators)."""
    return {(kube.REGISTRY[k].group, kube.REGISTRY[k].plural, verb)
            for k in kube.CLEANUP_ONLY_KINDS for verb in ("get", "list", "watch", "delete")}


LEASES = "coordination.k8s.io"


def lease_needs(code_calls: set[Grant]) -> set[Grant]:
    """What leader election uses: granted in the release namespace only."""
    return {grant for grant in code_calls if grant[0] == LEASES}


def needed(code_calls: set[Grant]) -> tuple[set[Grant], set[Grant]]:
    """(namespaced needs, cluster-scoped needs) of a cluster-wide operator, leases apart."""
    code_calls = code_calls - lease_needs(code_calls)
    children = child_resources()
    # The engine treats child kinds through one code path: a verb it used on one child kind
    # (within this test's scenario) it can use on any of them.
    child_verbs = {verb for group, res, verb in code_calls if (group, res) in children}
    namespaced = {(g, r, v) for g, r in children for v in child_verbs}
    namespaced |= code_calls | kopf_needs() | KOPF_EVENTS | OWNER_FINALIZERS | cleanup_only_needs()
    namespaced |= escalation_needs()
    return namespaced, set(KOPF_CLUSTER_SCOPED)


def operator_roles(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The roles bound to the operator, without the tenants' aggregated ones."""
    return [r for r in by_kind(manifests, kind)
            if not any(k.startswith("rbac.authorization.k8s.io/aggregate-to-")
                       for k in r["metadata"].get("labels", {}))]


def grants(roles: list[dict[str, Any]]) -> set[Grant]:
    out: set[Grant] = set()
    for role in roles:
        for rule in role["rules"]:
            assert not rule.get("resourceNames"), "rules are per kind, not per object"
            out |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"]
                    for v in rule["verbs"]}
    return out


def test_the_scenario_reaches_every_code_path(code_calls: set[Grant]) -> None:
    verbs = {v for _, _, v in code_calls}
    assert verbs == {"get", "list", "create", "patch", "delete"}
    assert (GROUP, f"{PLURAL}/status", "patch") in code_calls
    assert ("", "events", "create") in code_calls


def test_no_wildcards_anywhere() -> None:
    for values in ((), (NAMESPACED_VALUES,)):
        for sets in ((), ("watch.allNamespaces=false", "rbac.clusterScopedReads=true")):
            manifests = render(values, sets)
            for role in by_kind(manifests, "ClusterRole") + by_kind(manifests, "Role"):
                for rule in role["rules"]:
                    for key in ("apiGroups", "resources", "verbs"):
                        assert not any("*" in item for item in rule[key]), (role, rule)
                    assert "nonResourceURLs" not in rule


def test_cluster_wide_install_grants_exactly_what_the_code_uses(code_calls: set[Grant]) -> None:
    namespaced, cluster_scoped = needed(code_calls)
    granted = grants(operator_roles(render(), "ClusterRole"))
    assert sorted((namespaced | cluster_scoped) - granted) == [], "missing grants"
    assert sorted(granted - namespaced - cluster_scoped) == [], "grants the code never uses"


def test_namespaced_install_grants_per_namespace(code_calls: set[Grant]) -> None:
    namespaced, cluster_scoped = needed(code_calls)
    manifests = render((NAMESPACED_VALUES,), ("rbac.clusterScopedReads=true",))
    roles = [r for r in by_kind(manifests, "Role") if r not in leader_election_roles(manifests)]
    assert {r["metadata"]["namespace"] for r in roles} == {"team-a", "team-b"}
    for role in roles:
        granted = grants([role])
        assert sorted(namespaced - granted) == [], role["metadata"]["namespace"]
        assert sorted(granted - namespaced) == [], role["metadata"]["namespace"]
    reads = grants(operator_roles(manifests, "ClusterRole"))
    assert reads == cluster_scoped | KOPF_NAMESPACE_OBSERVER
    assert all(verb in ("get", "list", "watch") for _, _, verb in reads)


def leader_election_roles(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in by_kind(manifests, "Role")
            if r["metadata"]["name"].endswith("-leader-election")]


@pytest.mark.parametrize("values", [(), (NAMESPACED_VALUES,)])
def test_leases_are_granted_in_the_release_namespace_only(
        code_calls: set[Grant], values: tuple[Any, ...]) -> None:
    needs = lease_needs(code_calls)
    assert {verb for _, _, verb in needs} == {"get", "create", "patch"}
    manifests = render(values)
    (role,) = leader_election_roles(manifests)
    assert role["metadata"]["namespace"] == NAMESPACE
    assert grants([role]) == needs
    others = [r for r in operator_roles(manifests, "ClusterRole") + by_kind(manifests, "Role")
              if r is not role]
    assert not {g for g in grants(others) if g[0] == LEASES}
    assert leader_election_roles(render(values, ("leaderElection.enabled=false",
                                                 "replicaCount=1"))) == []


def test_bindings_bind_the_operator_service_account() -> None:
    for values, sets in (((), ()), ((NAMESPACED_VALUES,), ("rbac.clusterScopedReads=true",))):
        manifests = render(values, sets)
        sa = one_sa(manifests)
        roles = {(r["kind"], r["metadata"]["name"], r["metadata"].get("namespace"))
                 for r in operator_roles(manifests, "ClusterRole") + by_kind(manifests, "Role")}
        bindings = by_kind(manifests, "ClusterRoleBinding") + by_kind(manifests, "RoleBinding")
        assert len(bindings) == len(roles)
        for binding in bindings:
            ref = binding["roleRef"]
            ns = binding["metadata"].get("namespace") if ref["kind"] == "Role" else None
            assert (ref["kind"], ref["name"], ns) in roles
            assert binding["subjects"] == [
                {"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                 "namespace": sa["metadata"]["namespace"]}
            ]


def one_sa(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    (sa,) = by_kind(manifests, "ServiceAccount")
    return sa


def test_rbac_can_be_left_to_the_user() -> None:
    manifests = render((), ("rbac.create=false",))
    assert not [m for m in manifests if m["apiVersion"].startswith("rbac.")]


def node_tuning_status_roles(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in by_kind(manifests, "Role")
            if r["metadata"]["name"].endswith("-node-tuning-status")]


def test_node_tuning_status_is_one_get_on_the_charts_own_daemonset() -> None:
    """NodeTuningReady reads the DaemonSet the operator is told about (GPUPROXY_NODE_TUNING):
    a namespaced install grants exactly that object in the release namespace; a cluster-wide
    install's ClusterRole covers it already."""
    manifests = render((NAMESPACED_VALUES,), ("nodeTuning.enabled=true",))
    (role,) = node_tuning_status_roles(manifests)
    (ds,) = by_kind(manifests, "DaemonSet")
    assert role["metadata"]["namespace"] == ds["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [{"apiGroups": ["apps"], "resources": ["daemonsets"],
                              "resourceNames": [ds["metadata"]["name"]], "verbs": ["get"]}]
    (operator,) = by_kind(manifests, "Deployment")
    (container,) = operator["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["GPUPROXY_NODE_TUNING"] == f"{NAMESPACE}/{ds['metadata']['name']}"
    assert node_tuning_status_roles(render((NAMESPACED_VALUES,))) == []
    wide = render((), ("nodeTuning.enabled=true",))
    assert node_tuning_status_roles(wide) == []
    assert ("apps", "daemonsets", "get") in grants(operator_roles(wide, "ClusterRole"))
