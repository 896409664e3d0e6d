"""Error paths of one reconcile, on an in-memory API double: 422 on a child, transient errors at
the kopf boundary, name conflicts, and what the handlers turn them into."""

from __future__ import annotations

import base64
import copy
import logging
from collections.abc import Callable
from typing import Any

import kopf
import pytest

from gpuproxy_operator import engine, handlers, kube
from gpuproxy_operator.api.base import KIND
from gpuproxy_operator.status import condition
from tests.reconcile.conftest import cluster_body, secret_body

log = logging.getLogger("test")
Key = tuple[str, str | None, str]


class MemoryKube(kube.KubeClient):
    """Objects in a dict; `failures[(verb, kind, name)]` raises once per call until removed."""

    def __init__(self) -> None:
        super().__init__(kopf.ConnectionInfo(server="http://127.0.0.1:1"))
        self.objects: dict[Key, dict[str, Any]] = {}
        self.failures: dict[tuple[str, str, str | None], kube.KubeError] = {}
        self.writes: list[tuple[str, str, str]] = []
        self.versions = 0
        self.before_status_patch: Callable[[], None] | None = None

    def _bump(self, obj: dict[str, Any]) -> None:
        self.versions += 1
        obj["metadata"]["resourceVersion"] = str(self.versions)

    def _fail(self, verb: str, kind: str, name: str | None) -> None:
        exc = self.failures.get((verb, kind, name))
        if exc is not None:
            raise exc

    async def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any]:
        self._fail("get", kind, name)
        if (kind, namespace, name) not in self.objects:
            raise kube.NotFound("get", f"{kind} {name}", 404, "not found")
        return copy.deepcopy(self.objects[(kind, namespace, name)])

    async def list(self, kind: str, namespace: str | None,
                   labels: dict[str, str] | None = None) -> list[dict[str, Any]]:
        self._fail("list", kind, None)
        return [copy.deepcopy(o) for (k, ns, _), o in self.objects.items()
                if k == kind and ns == namespace and all(
                    o["metadata"].get("labels", {}).get(lk) == lv
                    for lk, lv in (labels or {}).items())]

    async def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        meta = manifest["metadata"]
        self._fail("create", manifest["kind"], meta["name"])
        key = (manifest["kind"], meta.get("namespace"), meta["name"])
        if key in self.objects and manifest["kind"] != "Event":
            raise kube.Conflict("create", meta["name"], 409, "exists")
        self.objects[key] = copy.deepcopy(manifest)
        self._bump(self.objects[key])
        self.writes.append(("create", manifest["kind"], meta["name"]))
        return copy.deepcopy(manifest)

    async def patch(self, kind: str, namespace: str | None, name: str, patch: dict[str, Any],
                    *, sub: str | None = None) -> dict[str, Any]:
        self._fail("patch", kind, name)
        if sub == "status" and self.before_status_patch is not None:
            hook, self.before_status_patch = self.before_status_patch, None
            hook()
        obj = self.objects[(kind, namespace, name)]
        want_version = patch.get("metadata", {}).get("resourceVersion")
        if want_version and want_version != obj["metadata"].get("resourceVersion"):
            raise kube.Conflict("patch", name, 409, "the object has been modified")
        for field, value in patch.items():
            if isinstance(value, dict) and isinstance(obj.get(field), dict):
                obj[field] = {**obj[field], **value}
            else:
                obj[field] = value
        self._bump(obj)
        self.writes.append(("patch", kind, name))
        return copy.deepcopy(obj)

    async def delete(self, kind: str, namespace: str | None, name: str) -> None:
        self.objects.pop((kind, namespace, name), None)
        self.writes.append(("delete", kind, name))

    async def request(self, verb: str, kind: kube.ResourceKind, namespace: str | None,
                      name: str | None = None, **kwargs: Any) -> Any:
        """Reconcile lists the HorizontalPodAutoscalers (kinds outside REGISTRY) here."""
        if verb == "list":
            return {"items": await self.list(kind.kind, namespace)}
        return await super().request(verb, kind, namespace, name, **kwargs)


@pytest.fixture
async def api() -> MemoryKube:
    api = MemoryKube()
    body = cluster_body()
    secret = secret_body("ns1")
    api.objects[(KIND, "ns1", "demo")] = body
    api.objects[("Secret", "ns1", "db-creds")] = secret
    return api


def cr_status(api: MemoryKube) -> dict[str, Any]:
    return dict(api.objects[(KIND, "ns1", "demo")].get("status") or {})


def child_writes(api: MemoryKube) -> list[tuple[str, str, str]]:
    return [w for w in api.writes if w[1] not in (KIND, "Event")]


async def test_child_rejected_with_422_is_degraded_with_fields_and_not_retried(
        api: MemoryKube) -> None:
    api.failures[("create", "PodDisruptionBudget", "demo-proxy")] = kube.Invalid(
        "create", "PodDisruptionBudget demo-proxy", 422, "invalid",
        [("spec.minAvailable", "must be less than replicas")])
    state = engine.OperatorState(kube=api)
    outcome = await engine.reconcile_cluster(state, ("ns1", "demo"), log)
    assert outcome.result == "degraded"
    degraded = condition(cr_status(api), "Degraded")
    assert degraded["reason"] == "ChildRejected"
    assert "spec.minAvailable: must be less than replicas" in degraded["message"]
    assert ("create", "Deployment", "demo-proxy") in api.writes  # the rest proceeds
    warnings = [o for (k, _, _), o in api.objects.items()
                if k == "Event" and o["type"] == "Warning"]
    assert any("spec.minAvailable" in e["message"] for e in warnings)
    before = len(child_writes(api))
    again = await engine.reconcile_cluster(state, ("ns1", "demo"), log)
    assert again.result == "degraded"
    assert len(child_writes(api)) == before  # the same rejected body is not sent again
    assert condition(cr_status(api), "Degraded")["reason"] == "ChildRejected"
    settled = len(api.writes)
    await engine.reconcile_cluster(state, ("ns1", "demo"), log)
    assert len(api.writes) == settled  # and, once the status says so, nothing is written


async def test_transient_errors_become_temporary_errors_with_backoff(api: MemoryKube) -> None:
    api.failures[("list", "Deployment", None)] = kube.Transient("list", "deployments", 503, "busy")
    state = engine.OperatorState(kube=api)
    with pytest.raises(kopf.TemporaryError) as err:
        await handlers.reconcile_handler(namespace="ns1", name="demo", memo=state, retry=3,
                                         logger=log)
    assert err.value.delay == 8.0
    assert child_writes(api) == []  # nothing written before everything was observed and built
    del api.failures[("list", "Deployment", None)]
    await handlers.reconcile_handler(namespace="ns1", name="demo", memo=state, retry=0,
                                     logger=log)
    assert ("create", "Deployment", "demo-proxy") in api.writes


async def test_invalid_spec_is_a_permanent_error_at_the_kopf_boundary(api: MemoryKube) -> None:
    api.objects[(KIND, "ns1", "demo")]["spec"]["proxy"]["replicas"] = "many"
    state = engine.OperatorState(kube=api)
    with pytest.raises(kopf.PermanentError, match=r"spec\.proxy\.replicas"):
        await handlers.reconcile_handler(namespace="ns1", name="demo", memo=state, retry=0,
                                         logger=log)
    assert child_writes(api) == []
    assert "spec.proxy.replicas" in condition(cr_status(api), "Degraded")["message"]


async def test_foreign_object_with_our_name_is_a_conflict_not_a_takeover(
        api: MemoryKube) -> None:
    api.objects[("ConfigMap", "ns1", "demo-redis")] = {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {
            "name": "demo-redis", "namespace": "ns1",
            "ownerReferences": [{"uid": "someone", "controller": True}]}, "data": {"a": "b"}}
    state = engine.OperatorState(kube=api)
    await engine.reconcile_cluster(state, ("ns1", "demo"), log)
    degraded = condition(cr_status(api), "Degraded")
    assert degraded["reason"] == "NameConflict"
    assert "ConfigMap ns1/demo-redis already exists and is not owned" in degraded["message"]
    assert api.objects[("ConfigMap", "ns1", "demo-redis")]["data"] == {"a": "b"}


async def test_deleted_cluster_is_left_to_garbage_collection(api: MemoryKube) -> None:
    api.objects[(KIND, "ns1", "demo")]["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    outcome = await engine.reconcile_cluster(engine.OperatorState(kube=api), ("ns1", "demo"), log)
    assert outcome.result == "gone"
    assert api.writes == []


async def test_status_write_rereads_after_a_conflict_and_keeps_the_autoscalers_condition(
        api: MemoryKube) -> None:
    scaling = {"type": "Scaling", "status": "True", "reason": "ScaledUp", "message": "2 -> 4"}

    def autoscaler_writes() -> None:
        obj = api.objects[(KIND, "ns1", "demo")]
        obj["status"] = {**(obj.get("status") or {}), "conditions": [scaling],
                         "desiredReplicas": 4}
        api._bump(obj)

    api.before_status_patch = autoscaler_writes
    await engine.reconcile_cluster(engine.OperatorState(kube=api), ("ns1", "demo"), log)
    status = cr_status(api)
    assert condition(status, "Scaling") == scaling
    assert condition(status, "Ready")["status"] == "False"
    assert status["desiredReplicas"] == 4


async def test_unusable_secret_content_names_the_secret_and_builds_nothing(
        api: MemoryKube) -> None:
    secret = api.objects[("Secret", "ns1", "db-creds")]
    secret["data"]["password"] = base64.b64encode(b"two\nlines").decode()
    outcome = await engine.reconcile_cluster(engine.OperatorState(kube=api), ("ns1", "demo"), log)
    assert outcome.result == "invalid"
    message = condition(cr_status(api), "Degraded")["message"]
    assert "db-creds" in message
    assert "data.password" in message
    assert child_writes(api) == []


async def test_unknown_immutable_field_rejection_says_how_to_get_unstuck(
        api: MemoryKube) -> None:
    state = engine.OperatorState(kube=api)
    await engine.reconcile_cluster(state, ("ns1", "demo"), log)
    body = api.objects[(KIND, "ns1", "demo")]
    body["spec"]["proxy"]["workers"] = 3  # restart-only: the Deployment is patched
    body["metadata"]["generation"] = 2
    api.failures[("patch", "Deployment", "demo-proxy")] = kube.Invalid(
        "patch", "Deployment demo-proxy", 422, "invalid",
        [("spec.selector", "Invalid value: {...}: field is immutable")])
    outcome = await engine.reconcile_cluster(state, ("ns1", "demo"), log)
    assert outcome.result == "degraded"
    message = condition(cr_status(api), "Degraded")["message"]
    assert "spec.selector: Invalid value: {...}: field is immutable" in message
    assert "kubectl -n ns1 delete deployment demo-proxy" in message


class DroppingKube(MemoryKube):
    """An API server on which a container field (startupProbe) is not served, as with a
    disabled feature gate: it silently drops the field from every write, like kube-apiserver
    drops disabled fields."""

    @staticmethod
    def _drop(obj: dict[str, Any]) -> dict[str, Any]:
        pod = ((obj.get("spec") or {}).get("template") or {}).get("spec") or {}
        for container in pod.get("containers", []):
            if container.get("name") == "proxy":  # the one child the test follows
                container.pop("startupProbe", None)
        return obj

    async def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        await super().create(manifest)
        meta = manifest["metadata"]
        obj = self._drop(self.objects[(manifest["kind"], meta.get("namespace"), meta["name"])])
        return copy.deepcopy(obj)

    async def patch(self, kind: str, namespace: str | None, name: str, patch: dict[str, Any],
                    *, sub: str | None = None) -> dict[str, Any]:
        await super().patch(kind, namespace, name, patch, sub=sub)
        return copy.deepcopy(self._drop(self.objects[(kind, namespace, name)]))


async def test_a_field_the_server_drops_is_reported_once_and_not_patched_forever() -> None:
    api = DroppingKube()
    api.objects[(KIND, "ns1", "demo")] = cluster_body()
    api.objects[("Secret", "ns1", "db-creds")] = secret_body("ns1")
    state = engine.OperatorState(kube=api)
    await engine.reconcile_cluster(state, ("ns1", "demo"), log)
    first = len(child_writes(api))
    for _ in range(3):
        await engine.reconcile_cluster(state, ("ns1", "demo"), log)
    assert len(child_writes(api)) == first  # converged as far as the server allows: no writes
    warnings = [o["message"] for (k, _, _), o in api.objects.items()
                if k == "Event" and o["reason"] == "ChildAltered"]
    assert len(warnings) == 1
    assert "Deployment demo-proxy" in warnings[0]
    assert "spec.template.spec.containers[0].startupProbe" in warnings[0]
    # An out-of-band edit of that child is still repaired.
    dep = api.objects[("Deployment", "ns1", "demo-proxy")]
    dep["spec"]["template"]["spec"]["containers"][0]["image"] = "evil:latest"
    await engine.reconcile_cluster(state, ("ns1", "demo"), log)
    assert ("patch", "Deployment", "demo-proxy") in api.writes[-3:]
