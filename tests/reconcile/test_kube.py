"""The API client: error mapping to typed exceptions, and calls against kmock."""

from __future__ import annotations

import datetime
import json
import re
import socket
from typing import Any

import kopf
import pytest
from aiohttp import web

from gpuproxy_operator import kube
from tests.reconcile.conftest import Cluster, cluster_body

DEP = kube.REGISTRY["Deployment"]


def status(code: int, reason: str, **details: Any) -> str:
    return json.dumps({"kind": "Status", "apiVersion": "v1", "code": code, "reason": reason,
                       "message": f"{reason} happened", "details": details})


def test_error_mapping() -> None:
    invalid = kube.map_error("create", DEP, "p", 422, status(422, "Invalid", causes=[
        {"field": "spec.replicas", "message": "must be >= 0", "reason": "FieldValueInvalid"}]))
    assert isinstance(invalid, kube.Invalid)
    assert invalid.causes == [("spec.replicas", "must be >= 0")]
    assert isinstance(kube.map_error("get", DEP, "p", 404, status(404, "NotFound",
                                                                   kind="deployments")),
                      kube.NotFound)
    assert isinstance(kube.map_error("create", DEP, None, 404, status(404, "NotFound",
                                                                       kind="namespaces")),
                      kube.NotFound)
    assert isinstance(kube.map_error("list", DEP, None, 404, "404 page not found"),
                      kube.MissingAPI)
    assert isinstance(kube.map_error("get", DEP, "p", 404, "404 page not found"), kube.MissingAPI)
    assert isinstance(kube.map_error("create", DEP, None, 409, status(409, "AlreadyExists")),
                      kube.Conflict)
    assert isinstance(kube.map_error("patch", DEP, "p", 403, status(403, "Forbidden")),
                      kube.Forbidden)
    transient = kube.map_error("get", DEP, "p", 503, "busy", retry_after="7")
    assert isinstance(transient, kube.Transient)
    assert transient.retry_after == 7.0
    assert isinstance(kube.map_error("get", DEP, "p", 429, "slow down"), kube.Transient)
    # An expired service-account token is not an RBAC problem: retried, not "check RBAC".
    expired = kube.map_error("patch", DEP, "p", 401, status(401, "Unauthorized"))
    assert isinstance(expired, kube.Transient)
    assert "credentials rejected" in str(expired)


async def test_client_calls_and_missing_api_against_kmock(cluster: Cluster, api_server: Any
                                                          ) -> None:
    del api_server.resources["monitoring.coreos.com/v1/prometheusrules"]
    calls: list[tuple[str, str, str]] = []
    client = kube.KubeClient(kopf.ConnectionInfo(server=str(api_server.url).rstrip("/")),
                             on_call=lambda *c: calls.append(c))
    try:
        body = cluster_body()
        await client.create(body)
        got = await client.get("GpuProxyCluster", "ns1", "demo")
        assert got["spec"] == body["spec"]
        await kube.patch_cluster_status(client, "ns1", "demo", {"desiredReplicas": 3})
        assert cluster.get("GpuProxyCluster", "ns1", "demo")["status"] == {"desiredReplicas": 3}
        assert [i["metadata"]["name"] for i in await client.list("GpuProxyCluster", "ns1")] == [
            "demo"]
        with pytest.raises(kube.NotFound):
            await client.get("GpuProxyCluster", "ns1", "nope")
        with pytest.raises(kube.MissingAPI):
            await client.list("PrometheusRule", "ns1")
        await kube.post_event(client, got, "Normal", "Scaled", "scaled to 3 replicas")
        [event] = cluster.events("ns1")
        assert event["reason"] == "Scaled"
        assert event["involvedObject"]["uid"] == got["metadata"]["uid"]
        await client.delete("GpuProxyCluster", "ns1", "demo")
        await client.delete("GpuProxyCluster", "ns1", "demo")  # already gone: fine
    finally:
        await client.close()
    assert ("get", "GpuProxyCluster", "404") in calls
    assert ("create", "GpuProxyCluster", "200") in calls


async def test_list_component_pods_filters_by_labels_client_side(
        cluster: Cluster, api_server: Any) -> None:
    client = kube.KubeClient(kopf.ConnectionInfo(server=str(api_server.url).rstrip("/")))
    labels = {"app.kubernetes.io/name": "gpuproxy", "app.kubernetes.io/instance": "demo",
              "app.kubernetes.io/component": "proxy"}
    for name, ip, ready, lab in (("p-1", "127.0.0.2", True, labels),
                                 ("p-0", "127.0.0.3", False, labels),
                                 ("other", "127.0.0.4", True, {"app": "x"})):
        await cluster.create({"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": name, "namespace": "ns1", "labels": lab}, "status": {
            "podIP": ip, "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}})
    await cluster.create({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {
        "name": "demo-proxy", "namespace": "ns1"}, "spec": {"replicas": 2, "paused": False}})
    try:
        pods = await kube.list_component_pods(client, "ns1", "demo", "proxy")
        await kube.patch_deployment_replicas(client, "ns1", "demo-proxy", 3)
    finally:
        await client.close()
    assert [(p.name, p.ip, p.ready) for p in pods] == [("p-0", "127.0.0.3", False),
                                                       ("p-1", "127.0.0.2", True)]
    assert cluster.get("Deployment", "ns1", "demo-proxy")["spec"] == {"replicas": 3,
                                                                      "paused": False}


async def test_connection_errors_are_transient() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = kube.KubeClient(kopf.ConnectionInfo(server=f"http://127.0.0.1:{port}"), timeout=2)
    try:
        with pytest.raises(kube.Transient):
            await client.get("Deployment", "ns1", "x")
    finally:
        await client.close()


async def test_event_body_passes_kube_apiservers_core_v1_event_validation() -> None:
    """The rules kube-apiserver applies to a core/v1 Event without eventTime (legacy
    validation): namespaces agree, timestamps are RFC 3339, names and fields within limits."""
    posted: list[dict[str, Any]] = []

    class Recorder(kube.KubeClient):
        async def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
            posted.append(manifest)
            return manifest

    client = Recorder(kopf.ConnectionInfo(server="http://127.0.0.1:1"))
    involved = {**cluster_body(name="a" * 63), "metadata": {
        "name": "a" * 63, "namespace": "team-a", "uid": "3f1c", "resourceVersion": "9"}}
    await kube.post_event(client, involved, "Warning", "ChildRejected", "é" * 2000)
    [event] = posted
    assert "eventTime" not in event  # else reportingController/action rules apply as well
    assert event["metadata"]["namespace"] == event["involvedObject"]["namespace"] == "team-a"
    assert {"apiVersion", "kind", "name", "namespace", "uid"} <= set(event["involvedObject"])
    name = event["metadata"]["name"]
    assert len(name) <= 253
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name)
    for stamp in ("firstTimestamp", "lastTimestamp"):
        assert datetime.datetime.fromisoformat(event[stamp]).tzinfo is not None
        assert event[stamp].endswith("Z")
    assert event["type"] in ("Normal", "Warning")
    assert 0 < len(event["reason"]) <= 128
    # 1024 bytes: the API's note limit (enforced for events.k8s.io and eventTime Events).
    assert event["message"] == "é" * 512
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", event["reportingComponent"])


async def test_every_body_is_sent_with_a_content_type_kube_apiserver_accepts() -> None:
    """kube-apiserver negotiates the body's serializer from Content-Type and answers 415 to
    anything else (aiohttp labels a plain str body text/plain), also for DeleteOptions."""
    accepted = {"application/json", "application/merge-patch+json", "application/yaml"}
    seen: list[tuple[str, str]] = []

    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        ctype = request.headers.get("Content-Type", "").split(";")[0]
        seen.append((request.method, ctype))
        if body and ctype not in accepted:
            return web.json_response({"kind": "Status", "code": 415, "reason":
                                      "UnsupportedMediaType", "message": ctype}, status=415)
        return web.json_response({"kind": "Status", "status": "Success"})

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    client = kube.KubeClient(kopf.ConnectionInfo(server=f"http://127.0.0.1:{port}"))
    try:
        await client.create(cluster_body())
        await client.patch("Deployment", "ns1", "demo-proxy", {"spec": {"replicas": 2}})
        await client.delete("StatefulSet", "ns1", "demo-redis")
    finally:
        await client.close()
        await runner.cleanup()
    assert [m for m, _ in seen] == ["POST", "PATCH", "DELETE"]
    assert all(c in accepted for _, c in seen), seen
