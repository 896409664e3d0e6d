"""The bundled Redis requires a password: reconcile generates its Secret once (random, owned by
the cluster), never regenerates it, mounts it into the proxies and Redis, and deletes it when
the spec names a Secret of its own."""

from __future__ import annotations

import base64

from gpuproxy_operator import engine
from gpuproxy_operator.api.base import KIND
from tests.reconcile.test_engine_errors import MemoryKube, api, log

__all__ = ["api"]  # fixture
SECRET = ("Secret", "ns1", "demo-redis-auth")


def _password(api: MemoryKube) -> str:
    return base64.b64decode(api.objects[SECRET]["data"]["password"]).decode()


async def test_the_generated_password_is_created_once_and_used_everywhere(
        api: MemoryKube) -> None:
    state = engine.OperatorState(kube=api)
    await engine.reconcile_cluster(state, ("ns1", "demo"), log)
    first = _password(api)
    assert len(first) >= 32
    owner = api.objects[SECRET]["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["controller"]) == (KIND, True)
    # No hash of it anywhere readable.
    assert not [v for v in api.objects[SECRET]["metadata"]["annotations"].values()
                if first in v]

    api.objects[(KIND, "ns1", "demo")]["spec"].setdefault("redis", {})["maxmemory"] = "2gb"
    api.objects[(KIND, "ns1", "demo")]["metadata"]["generation"] = 2
    for _ in range(3):
        await engine.reconcile_cluster(state, ("ns1", "demo"), log)
    assert _password(api) == first
    assert [w for w in api.writes if w[1:] == ("Secret", "demo-redis-auth")] == [
        ("create", "Secret", "demo-redis-auth")]

    # A fresh operator (a restart, a new leader) keeps it too.
    await engine.reconcile_cluster(engine.OperatorState(kube=api), ("ns1", "demo"), log)
    assert _password(api) == first

    redis = api.objects[("StatefulSet", "ns1", "demo-redis")]["spec"]["template"]["spec"]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in redis["containers"][0]["env"]}
    assert env["REDIS_PASSWORD"] == {"name": "demo-redis-auth", "key": "password"}
    proxy = api.objects[("Deployment", "ns1", "demo-proxy")]["spec"]["template"]["spec"]
    volumes = {v["name"]: v.get("secret") for v in proxy["volumes"]}
    assert volumes["secret-redis"]["secretName"] == "demo-redis-auth"
    config = api.objects[("ConfigMap", "ns1", "demo-proxy")]["data"]["config.yaml"]
    assert "redis_password: /etc/gpuproxy/secrets/redis/password" in config


async def test_a_secret_of_its_own_replaces_the_generated_one(api: MemoryKube) -> None:
    state = engine.OperatorState(kube=api)
    await engine.reconcile_cluster(state, ("ns1", "demo"), log)
    assert SECRET in api.objects
    spec = api.objects[(KIND, "ns1", "demo")]["spec"]
    spec.setdefault("redis", {})["passwordSecretRef"] = {"name": "mine", "key": "pw"}
    api.objects[(KIND, "ns1", "demo")]["metadata"]["generation"] = 2
    await engine.reconcile_cluster(state, ("ns1", "demo"), log)
    assert SECRET not in api.objects
    proxy = api.objects[("Deployment", "ns1", "demo-proxy")]["spec"]["template"]["spec"]
    volumes = {v["name"]: v.get("secret") for v in proxy["volumes"]}
    assert volumes["secret-redis"]["secretName"] == "mine"


async def test_a_generated_secret_that_lost_its_label_keeps_its_password(
        api: MemoryKube) -> None:
    await engine.reconcile_cluster(engine.OperatorState(kube=api), ("ns1", "demo"), log)
    first = _password(api)
    # Someone strips our cluster label: children are listed by it, so the Secret looks missing,
    # the create meets a 409 and reconcile re-adopts it; a new random value would rotate the
    # password under running Redis and proxy pods.
    labels = api.objects[SECRET]["metadata"]["labels"]
    del labels["gpuproxy.aiserve.farm/cluster"]
    await engine.reconcile_cluster(engine.OperatorState(kube=api), ("ns1", "demo"), log)
    assert _password(api) == first
    assert api.objects[SECRET]["metadata"]["labels"]["gpuproxy.aiserve.farm/cluster"] == "demo"
