"""Bundled Redis: redis.conf pinned to the guide, the StatefulSet with and without
persistence and password, and nothing at all for an external Redis."""

from __future__ import annotations

from typing import Any

from tests.operator.clusters import CREDENTIALS, by_key, cluster, lean_body, minimal_body

from gpuproxy_operator.builders import BuildInputs, build_all
from gpuproxy_operator.builders.common import Manifest

# The guide's redis.conf, in its order, plus what the operator adds for Kubernetes; maxmemory
# holds the rate-limit counters only (the guide's 16gb is sized for a dedicated host). Protected
# mode stays on: every client authenticates.
GUIDE_REDIS_CONF = """\
bind 0.0.0.0
port 6379
protected-mode yes
tcp-backlog 65535
timeout 300
tcp-keepalive 60
maxmemory 1gb
maxmemory-policy allkeys-lru
save ""
appendonly no
io-threads 4
io-threads-do-reads yes
dir /data
"""


def _objects(body: dict[str, Any]) -> dict[tuple[str, str], Manifest]:
    return by_key(build_all(cluster(body), BuildInputs(database_credentials=CREDENTIALS)))


def _persistent_body() -> dict[str, Any]:
    body = minimal_body()
    body["spec"]["redis"] = {
        "persistence": True, "storageSize": "50Gi", "storageClassName": "fast-ssd",
        "passwordSecretRef": {"name": "redis-auth", "key": "pw"}, "maxmemory": "2gb",
        "maxmemoryPolicy": "allkeys-lfu", "ioThreads": 8, "tcpBacklog": 1024,
        "timeoutSeconds": 0, "tcpKeepaliveSeconds": 30,
    }
    return body


def test_default_redis_conf_is_the_guides() -> None:
    conf = _objects(minimal_body())[("ConfigMap", "mini-redis")]["data"]["redis.conf"]
    assert conf == GUIDE_REDIS_CONF


def test_persistence_uses_the_guides_snapshot_schedule_and_spec_values() -> None:
    conf = _objects(_persistent_body())[("ConfigMap", "mini-redis")]["data"]["redis.conf"]
    lines = conf.splitlines()
    assert [ln for ln in lines if ln.startswith("save")] == [
        "save 900 1", "save 300 10", "save 60 10000"
    ]
    for expected in ("maxmemory 2gb", "maxmemory-policy allkeys-lfu", "io-threads 8",
                     "tcp-backlog 1024", "timeout 0", "tcp-keepalive 30"):
        assert expected in lines


def test_statefulset_cache_only() -> None:
    objs = _objects(minimal_body())
    sts = objs[("StatefulSet", "mini-redis")]
    assert sts["spec"]["replicas"] == 1
    assert sts["spec"]["serviceName"] == "mini-redis-headless"
    assert "volumeClaimTemplates" not in sts["spec"]
    pod = sts["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 999
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["data"] == {"name": "data", "emptyDir": {}}
    [c] = pod["containers"]
    # Without a passwordSecretRef: the Secret the operator generates once (engine).
    assert [c["command"], c["args"]] == [
        ["redis-server"], ["/etc/redis/redis.conf", "--requirepass", "$(REDIS_PASSWORD)"]]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"]}
    assert env == {"REDIS_PASSWORD": {"name": "mini-redis-auth", "key": "password"},
                   "REDISCLI_AUTH": {"name": "mini-redis-auth", "key": "password"}}
    assert c["livenessProbe"]["tcpSocket"] == {"port": "redis"}
    assert "PONG" in c["readinessProbe"]["exec"]["command"][-1]
    headless = objs[("Service", "mini-redis-headless")]["spec"]
    assert headless["clusterIP"] == "None"
    client = objs[("Service", "mini-redis")]["spec"]
    assert "clusterIP" not in client
    assert client["ports"] == [{"name": "redis", "port": 6379, "targetPort": "redis",
                                "protocol": "TCP"}]


def test_statefulset_with_persistence_and_password() -> None:
    sts = _objects(_persistent_body())[("StatefulSet", "mini-redis")]
    [claim] = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"] == {
        "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "50Gi"}},
        "storageClassName": "fast-ssd",
    }
    pod = sts["spec"]["template"]["spec"]
    assert "data" not in {v["name"] for v in pod["volumes"]}
    [c] = pod["containers"]
    # $(REDIS_PASSWORD) is expanded by the kubelet from the env var below.
    assert c["args"] == ["/etc/redis/redis.conf", "--requirepass", "$(REDIS_PASSWORD)"]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"]}
    assert env["REDIS_PASSWORD"] == {"name": "redis-auth", "key": "pw"}
    assert env["REDISCLI_AUTH"] == {"name": "redis-auth", "key": "pw"}


def test_external_redis_builds_no_redis_objects() -> None:
    objs = _objects(lean_body())
    assert not [key for key in objs if "redis" in key[1]]
