"""API economy: reconcile reads children from the watch caches and the credentials Secret from a
single-object watch (a rotation reaches the userlist in seconds), a converged cluster costs no
request between resyncs, our own writes are seen until the watches echo them, requests go
through a client-side token bucket, and reconciles run a few at a time."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from typing import Any

import kopf
import pytest

from gpuproxy_operator import engine, kube
from gpuproxy_operator.api.base import KIND
from gpuproxy_operator.cache import ChildCache
from gpuproxy_operator.ratelimit import TokenBucket
from tests.reconcile.conftest import (
    Cluster,
    Operator,
    cluster_body,
    condition,
    eventually,
    secret_body,
)
from tests.reconcile.ha_harness import Candidate, agent

WAIT = 60.0
CHILD_PLURALS = {kube.REGISTRY[k].plural for k in kube.CHILD_KINDS}


def ours(cluster: Cluster, since: int = 0) -> list[Any]:
    """Requests of the operator's own client (kopf's watches are kopf's)."""
    return [r for r in list(cluster.server)[since:]
            if r.headers.get("User-Agent", "").startswith("gpuproxy-operator")]


def reads(requests: list[Any]) -> list[str]:
    """GETs that are not the periodic list of clusters or the autoscaler-ownership HPA list."""
    return [f"GET {r.url.path}?{r.url.query_string}" for r in requests
            if r.method.value == "GET" and "horizontalpodautoscalers" not in r.url.path
            and r.url.path != kube.CLUSTER.path(None)]


def ready(cluster: Cluster, namespace: str = "ns1", name: str = "demo") -> bool:
    cr = cluster.find(KIND, namespace, name)
    return condition(cr, "Ready").get("status") == "True" and condition(
        cr, "Progressing").get("status") == "False"


async def converge(cluster: Cluster, operator: Operator, *bodies: dict[str, Any]) -> None:
    for body in bodies:
        ns = body["metadata"]["namespace"]
        if cluster.find("Secret", ns, "db-creds") is None:
            await cluster.create(secret_body(ns))
        await cluster.create(body)
    if operator.state is None:
        await operator.start()
    for body in bodies:
        meta = body["metadata"]
        await eventually(lambda m=meta: ready(cluster, m["namespace"], m["name"]), WAIT)


async def test_child_events_of_a_converged_cluster_cost_no_request(
        cluster: Cluster, operator: Operator) -> None:
    operator.resync_seconds = 3600.0
    await converge(cluster, operator, cluster_body())
    await asyncio.sleep(1.0)  # the last status write's echo
    mark, base = cluster.mark(), operator.reconciles("child")
    for name in ("demo-proxy", "demo-pgbouncer"):
        await cluster.patch("Deployment", "ns1", name,
                            {"metadata": {"annotations": {"example.com/touched": "yes"}}})
    await eventually(lambda: operator.reconciles("child") >= base + 2, WAIT)
    await asyncio.sleep(0.5)
    assert reads(ours(cluster, mark)) == []  # no GET of the cluster, its children or Secret
    assert cluster.operator_writes(mark, events=True) == []


async def test_resyncs_read_only_the_list_of_clusters(
        cluster: Cluster, operator: Operator) -> None:
    operator.resync_seconds = 0.5
    await converge(cluster, operator, cluster_body("demo", "ns1"), cluster_body("demo", "ns2"))
    await asyncio.sleep(1.0)
    base = operator.reconciles("resync")
    mark = cluster.mark()
    await eventually(lambda: operator.reconciles("resync") >= base + 6, WAIT)
    requests = ours(cluster, mark)
    assert reads(requests) == []
    assert sum(1 for r in requests if r.url.path == kube.CLUSTER.path(None)) >= 3
    assert cluster.operator_writes(mark, events=True) == []


def userlist(cluster: Cluster) -> str:
    data = cluster.get("Secret", "ns1", "demo-pgbouncer")["data"]
    return "".join(base64.b64decode(v).decode() for v in data.values())


async def test_a_password_rotation_reaches_the_userlist_within_seconds(
        cluster: Cluster, operator: Operator) -> None:
    operator.resync_seconds = 3600.0  # only the Secret's watch can notice
    await converge(cluster, operator, cluster_body())
    assert "s3cret" in userlist(cluster)
    mark = cluster.mark()
    rotated = time.monotonic()
    new = base64.b64encode(b"rotated-pw").decode()
    await cluster.patch("Secret", "ns1", "db-creds", {"data": {"password": new}})
    await eventually(lambda: "rotated-pw" in userlist(cluster), WAIT)
    took = time.monotonic() - rotated
    assert took < 10.0, took  # typically well under a second
    secret = kube.REGISTRY["Secret"].path("ns1", "db-creds")
    assert not [r for r in ours(cluster, mark) if r.url.path == secret]  # no GET: the watch
    watches = [r for r in ours(cluster) if r.url.path == kube.REGISTRY["Secret"].path("ns1")
               and r.url.query.get("watch") == "true"]
    assert watches
    assert {r.url.query.get("fieldSelector") for r in watches} == {"metadata.name=db-creds"}


async def test_one_watch_per_secret_shared_and_stopped_with_its_last_cluster(
        cluster: Cluster, operator: Operator) -> None:
    one, two = cluster_body("one", "ns1"), cluster_body("two", "ns1")
    await converge(cluster, operator, one, two)
    state = operator.state
    assert state is not None
    assert state.secrets is not None
    watched = state.secrets.watched
    assert set(watched) == {("ns1", "db-creds")}
    assert watched[("ns1", "db-creds")].users == {("ns1", "one"), ("ns1", "two")}
    await cluster.delete(KIND, "ns1", "one")
    await eventually(lambda: watched[("ns1", "db-creds")].users == {("ns1", "two")}, WAIT)
    await cluster.delete(KIND, "ns1", "two")
    await eventually(lambda: watched == {}, WAIT)


def test_token_bucket_allows_a_burst_then_spaces_requests_at_the_qps() -> None:
    now = [100.0]
    bucket = TokenBucket(qps=10, burst=3, clock=lambda: now[0])
    assert [bucket.reserve() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert [round(bucket.reserve(), 3) for _ in range(3)] == [0.1, 0.2, 0.3]
    now[0] += 1.0  # refilled 10 tokens' worth: back to the burst, no more
    assert [bucket.reserve() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert round(bucket.reserve(), 3) == 0.1
    assert TokenBucket(qps=0, burst=1).reserve() == 0.0  # 0: no limit


async def test_the_client_waits_for_its_rate_limit(cluster: Cluster, api_server: Any) -> None:
    client = kube.KubeClient(kopf.ConnectionInfo(server=str(api_server.url).rstrip("/")),
                             limiter=TokenBucket(qps=20, burst=2))
    await cluster.create(secret_body("ns1"))
    try:
        started = time.monotonic()
        await asyncio.gather(*(client.get("Secret", "ns1", "db-creds") for _ in range(12)))
        took = time.monotonic() - started
    finally:
        await client.close()
    assert took >= (12 - 2) / 20 - 0.02, took


@pytest.fixture
async def bounded(api_server: Any, cluster: Cluster) -> AsyncIterator[Candidate]:
    candidate = Candidate(str(api_server.url).rstrip("/"), None, concurrency=2, name="op-bounded")
    yield candidate
    await candidate.stop()


async def test_startup_reconciles_run_a_few_at_a_time(
        cluster: Cluster, bounded: Candidate, monkeypatch: pytest.MonkeyPatch) -> None:
    bodies = [cluster_body(f"c{i}", "ns1") for i in range(6)]
    await cluster.create(secret_body("ns1"))
    for body in bodies:
        await cluster.create(body)
    running, most = 0, 0
    real = engine.reconcile_cluster

    async def counting(*args: Any, **kwargs: Any) -> engine.Outcome:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            return await real(*args, **kwargs)
        finally:
            running -= 1

    monkeypatch.setattr(engine, "reconcile_cluster", counting)
    bounded.start()
    for body in bodies:
        await eventually(lambda b=body: ready(cluster, "ns1", b["metadata"]["name"]), WAIT)
    assert most == 2, most  # six clusters at once, two at a time
    assert agent("op-bounded") in {r.headers.get("User-Agent") for r in ours(cluster)}


# --- the cache of our own writes (pure) -------------------------------------------------------

def obj(name: str, rv: str | None) -> dict[str, Any]:
    return {"kind": "ConfigMap", "metadata": {"name": name, "resourceVersion": rv}}


def test_own_writes_are_seen_until_the_watch_echoes_them() -> None:
    now = [0.0]
    cache = ChildCache(clock=lambda: now[0])
    cm, key = ("ns1", "demo"), ("ConfigMap", "a")
    # Created: the watch has not delivered it yet -> our answer; once it has -> the watch's.
    cache.wrote(cm, key, None, obj("a", "5"))
    assert cache.resolve(cm, key, None) == obj("a", "5")
    assert cache.resolve(cm, key, obj("a", "5")) == obj("a", "5")
    assert cache.resolve(cm, key, None) is None  # forgotten once echoed
    # Patched: the old version -> our answer; any other version -> the watch's (newer).
    cache.wrote(cm, key, obj("a", "5"), obj("a", "6"))
    assert cache.resolve(cm, key, obj("a", "5")) == obj("a", "6")
    assert cache.resolve(cm, key, obj("a", "7")) == obj("a", "7")
    # Deleted: absent until the watch shows the deletion.
    cache.wrote(cm, key, obj("a", "7"), None)
    assert cache.resolve(cm, key, obj("a", "7")) is None
    assert cache.resolve(cm, key, None) is None
    # Replaced (delete + create): the old one and the gap between both are "older".
    cache.wrote(cm, key, obj("a", "8"), obj("a", "10"), replaced=True)
    assert cache.resolve(cm, key, obj("a", "8")) == obj("a", "10")
    assert cache.resolve(cm, key, None) == obj("a", "10")
    assert cache.resolve(cm, key, obj("a", "10")) == obj("a", "10")
    # Two writes before the first echo: both earlier versions are older.
    cache.wrote(cm, key, obj("a", "10"), obj("a", "11"))
    cache.wrote(cm, key, obj("a", "11"), obj("a", "12"))
    assert cache.resolve(cm, key, obj("a", "10")) == obj("a", "12")
    # A watch that never echoes (broken): trusted again after a while.
    now[0] += 31.0
    assert cache.resolve(cm, key, obj("a", "10")) == obj("a", "10")
