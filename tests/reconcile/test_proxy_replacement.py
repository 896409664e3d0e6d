"""An immutable-field change of the proxy Deployment (its selector) never deletes it on its own:
replacing it drops every client connection. Reconcile leaves it as it is, says Degraded with a
Warning Event naming the field and the annotation that allows the replacement for this
generation; other children (the Redis StatefulSet's claims) are still replaced."""

from __future__ import annotations

from typing import Any

from gpuproxy_operator import engine, reconcile
from gpuproxy_operator.api.base import KIND
from gpuproxy_operator.status import condition
from tests.reconcile.test_engine_errors import MemoryKube, api, cr_status, log

__all__ = ["api"]  # fixture
PROXY = ("Deployment", "demo-proxy")
REDIS = ("StatefulSet", "demo-redis")
COMMAND = "kubectl -n ns1 annotate gpc demo gpuproxy.aiserve.farm/allow-proxy-replacement="


def deployment(selector: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "demo-proxy", "ownerReferences": [
                {"uid": "u", "controller": True}]},
            "spec": {"selector": {"matchLabels": selector}, "replicas": 2}}


def test_the_planner_blocks_replacements_it_is_told_not_to_make() -> None:
    want = deployment({"app": "proxy", "tier": "edge"})
    have = {PROXY: deployment({"app": "proxy"})}
    blocked = reconcile.plan([want], have, "u", no_replace={PROXY})
    assert blocked.actions == []
    assert blocked.blocked == [reconcile.Blocked("Deployment", "demo-proxy", ("spec.selector",))]
    allowed = reconcile.plan([want], have, "u")
    assert [a.verb for a in allowed.actions] == ["replace"]
    assert allowed.blocked == []
    held = reconcile.plan([], have, "u", hold={PROXY})  # neither changed nor deleted
    assert held.actions == []


def events(api: MemoryKube, reason: str) -> list[dict[str, Any]]:
    return [o for (k, _, _), o in api.objects.items() if k == "Event" and o["reason"] == reason]


def child_writes(api: MemoryKube, since: int, key: tuple[str, str]) -> list[str]:
    return [verb for verb, kind, name in api.writes[since:] if (kind, name) == key]


async def test_a_selector_change_blocks_the_proxy_but_replaces_redis_claims(
        api: MemoryKube) -> None:
    state = engine.OperatorState(kube=api)
    await engine.reconcile_cluster(state, ("ns1", "demo"), log)
    # As if an older operator had created both with other immutable fields.
    proxy = api.objects[("Deployment", "ns1", "demo-proxy")]
    proxy["spec"]["selector"]["matchLabels"]["example.com/old"] = "yes"
    redis = api.objects[("StatefulSet", "ns1", "demo-redis")]
    redis["spec"]["serviceName"] = "old-headless"
    since = len(api.writes)
    outcome = await engine.reconcile_cluster(state, ("ns1", "demo"), log)
    assert outcome.result == "degraded"
    assert child_writes(api, since, PROXY) == []  # no delete, no patch into a 422
    assert child_writes(api, since, REDIS) == ["delete", "create"]  # as before
    degraded = condition(cr_status(api), "Degraded")
    assert degraded["reason"] == "ReplacementBlocked"
    assert "Deployment demo-proxy: spec.selector changed" in degraded["message"]
    assert "drops all client connections" in degraded["message"]
    assert f"{COMMAND}1 --overwrite" in degraded["message"]
    warnings = events(api, "ReplacementBlocked")
    assert len(warnings) == 1
    assert warnings[0]["type"] == "Warning"
    assert COMMAND in warnings[0]["message"]
    # Still blocked on the next pass, without another Event.
    await engine.reconcile_cluster(state, ("ns1", "demo"), log)
    assert child_writes(api, since, PROXY) == []
    assert len(events(api, "ReplacementBlocked")) == 1

    # An annotation for another generation does not count; this generation's does.
    body = api.objects[(KIND, "ns1", "demo")]
    body["metadata"]["annotations"] = {
        "gpuproxy.aiserve.farm/allow-proxy-replacement": "0"}
    await engine.reconcile_cluster(state, ("ns1", "demo"), log)
    assert child_writes(api, since, PROXY) == []
    body["metadata"]["annotations"]["gpuproxy.aiserve.farm/allow-proxy-replacement"] = "1"
    outcome = await engine.reconcile_cluster(state, ("ns1", "demo"), log)
    assert child_writes(api, since, PROXY) == ["delete", "create"]
    assert "example.com/old" not in api.objects[("Deployment", "ns1", "demo-proxy")][
        "spec"]["selector"]["matchLabels"]
    assert events(api, "Replaced")
    await engine.reconcile_cluster(state, ("ns1", "demo"), log)
    assert condition(cr_status(api), "Degraded")["status"] == "False"
