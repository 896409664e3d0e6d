"""A missing, unreadable or unusable credentials Secret keeps the last good children: the
PgBouncer userlist Secret is never deleted or blanked and PgBouncer is left as it is, while the
status says Degraded with what to do; a good Secret again converges."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from gpuproxy_operator import engine, kube
from gpuproxy_operator.api.base import KIND
from gpuproxy_operator.status import condition as status_condition
from tests.reconcile.conftest import (
    Cluster,
    Operator,
    cluster_body,
    condition,
    eventually,
    secret_body,
)
from tests.reconcile.test_engine_errors import MemoryKube, api, cr_status, log

__all__ = ["api"]  # fixture
WAIT = 60.0
HELD = {("Secret", "demo-pgbouncer"), ("Deployment", "demo-pgbouncer")}


def pgbouncer(cluster: Cluster) -> tuple[dict[str, Any], dict[str, Any]]:
    return (cluster.get("Secret", "ns1", "demo-pgbouncer"),
            cluster.get("Deployment", "ns1", "demo-pgbouncer"))


def content(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k in ("data", "spec")}


async def test_deleted_secret_keeps_the_userlist_and_pgbouncer_until_it_is_back(
        cluster: Cluster, operator: Operator) -> None:
    operator.resync_seconds = 0.5  # many passes while the Secret is gone
    body = cluster_body()
    await cluster.create(secret_body("ns1"))
    await cluster.create(body)
    await operator.start()
    await eventually(lambda: condition(cluster.find(KIND, "ns1", "demo"), "Ready")
                     .get("status") == "True", WAIT)
    userlist, deployment = pgbouncer(cluster)
    mark = cluster.mark()

    await cluster.delete("Secret", "ns1", "db-creds")
    degraded = await eventually(lambda: (c := condition(cluster.find(KIND, "ns1", "demo"),
                                                        "Degraded")).get("reason")
                                == "CredentialsUnavailable" and c, WAIT)
    assert "Secret ns1/db-creds not found" in degraded["message"]
    assert "kubectl -n ns1 create secret generic db-creds" in degraded["message"]
    assert "Secret demo-pgbouncer" in degraded["message"]
    assert "keep their last good state" in degraded["message"]
    base = operator.reconciles("resync")
    await eventually(lambda: operator.reconciles("resync") >= base + 4, WAIT)
    held_paths = {cluster.path(k, "ns1", n) for k, n in HELD}
    touched = [w for w in cluster.operator_writes(mark) if w.split(" ", 1)[1] in held_paths]
    assert touched == []  # neither deleted, blanked nor patched
    now_userlist, now_deployment = pgbouncer(cluster)
    assert content(now_userlist) == content(userlist)
    assert content(now_deployment) == content(deployment)
    warnings = [e for e in cluster.events("ns1") if e["reason"] == "CredentialsUnavailable"]
    assert warnings
    assert warnings[0]["type"] == "Warning"

    rotated = secret_body("ns1")
    rotated["data"]["password"] = base64.b64encode(b"new-pw").decode()
    await cluster.create(rotated)
    await eventually(lambda: "new-pw" in base64.b64decode(
        cluster.get("Secret", "ns1", "demo-pgbouncer")["data"]["userlist.txt"]).decode(), WAIT)
    await eventually(lambda: condition(cluster.find(KIND, "ns1", "demo"), "Degraded")
                     .get("status") == "False", WAIT)


def held_writes(api: MemoryKube, since: int) -> list[tuple[str, str, str]]:
    return [w for w in api.writes[since:] if (w[1], w[2]) in HELD]


async def converged(api: MemoryKube) -> engine.OperatorState:
    state = engine.OperatorState(kube=api)
    await engine.reconcile_cluster(state, ("ns1", "demo"), log)
    assert {(k, n) for k, _, n in api.objects} >= HELD
    return state


async def test_an_unreadable_secret_is_reported_with_the_rbac_fix(api: MemoryKube) -> None:
    state = await converged(api)
    since = len(api.writes)
    api.failures[("get", "Secret", "db-creds")] = kube.Forbidden(
        "get", "Secret ns1/db-creds", 403, 'secrets "db-creds" is forbidden')
    outcome = await engine.reconcile_cluster(state, ("ns1", "demo"), log)
    assert outcome.result == "degraded"
    degraded = status_condition(cr_status(api), "Degraded")
    assert degraded["reason"] == "CredentialsUnavailable"
    assert "cannot read database credentials Secret ns1/db-creds" in degraded["message"]
    assert "grant the operator get, list and watch on secrets in ns1" in degraded["message"]
    assert held_writes(api, since) == []


@pytest.mark.parametrize("broken", [{"password": None}, {"username": "%%%not-base64"}])
async def test_an_unusable_secret_keeps_the_last_good_children(
        api: MemoryKube, broken: dict[str, Any]) -> None:
    state = await converged(api)
    since = len(api.writes)
    data = api.objects[("Secret", "ns1", "db-creds")]["data"]
    for key, value in broken.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    outcome = await engine.reconcile_cluster(state, ("ns1", "demo"), log)
    assert outcome.result == "degraded"
    assert status_condition(cr_status(api), "Degraded")["reason"] == "CredentialsUnavailable"
    assert held_writes(api, since) == []
    assert ("Secret", "ns1", "demo-pgbouncer") in api.objects
