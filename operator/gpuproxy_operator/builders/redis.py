"""The bundled Redis for shared rate limits: redis.conf ConfigMap, a one-replica StatefulSet,
its client Service and the headless Service that governs the StatefulSet."""

from __future__ import annotations

from typing import Any

from gpuproxy_operator.api.cluster import GpuProxyCluster
from gpuproxy_operator.builders.common import (
    Manifest,
    container_security_context,
    metadata,
    pod_security_context,
    resources,
    selector,
    service_port,
    stable_hash,
    tmp_mount,
    tmp_volume,
    with_spec_hash,
)
from gpuproxy_operator.builders.images import redis_image
from gpuproxy_operator.builders.proxy_config import REDIS_PORT
from gpuproxy_operator.builders.redis_auth import redis_password_ref
from gpuproxy_operator.naming import CONFIG_HASH_ANNOTATION, child_name
from gpuproxy_operator.sizing import redis_resources

# The redis user of the official images.
REDIS_UID = 999
CONFIG_DIR = "/etc/redis"
CONF_FILE = "redis.conf"
DATA_DIR = "/data"
HEADLESS_SUFFIX = "headless"
# The guide's RDB snapshot schedule when persistence is wanted.
SNAPSHOT_SCHEDULE = ("900 1", "300 10", "60 10000")


def redis_conf(cluster: GpuProxyCluster) -> str:
    r = cluster.spec.redis
    lines = [
        "bind 0.0.0.0",
        "port 6379",
        # Every client authenticates (requirepass from the password Secret), so protected
        # mode, which refuses remote clients only while there is no password, stays on: the
        # NetworkPolicy is a second line, not the only one.
        "protected-mode yes",
        f"tcp-backlog {r.tcp_backlog}",
        f"timeout {r.timeout_seconds}",
        f"tcp-keepalive {r.tcp_keepalive_seconds}",
        f"maxmemory {r.maxmemory}",
        f"maxmemory-policy {r.maxmemory_policy}",
    ]
    if r.persistence:
        lines += [f"save {s}" for s in SNAPSHOT_SCHEDULE]
    else:
        lines.append('save ""')
    lines += [
        "appendonly no",
        f"io-threads {r.io_threads}",
        "io-threads-do-reads yes",
        f"dir {DATA_DIR}",
    ]
    return "\n".join(lines) + "\n"


def _names(cluster: GpuProxyCluster) -> tuple[str, str]:
    name = child_name(cluster.metadata.name, "redis")
    return name, child_name(cluster.metadata.name, "redis", HEADLESS_SUFFIX)


def build_redis_configmap(cluster: GpuProxyCluster) -> Manifest:
    name, _ = _names(cluster)
    return with_spec_hash({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(cluster, name, "redis", redis_image(cluster)),
        "data": {CONF_FILE: redis_conf(cluster)},
    })


def build_redis_services(cluster: GpuProxyCluster) -> list[Manifest]:
    """The client Service and the headless Service the StatefulSet needs for pod DNS."""
    name, headless = _names(cluster)
    image = redis_image(cluster)
    out = []
    for svc_name, cluster_ip in ((name, None), (headless, "None")):
        spec: dict[str, Any] = {
            "type": "ClusterIP",
            "selector": selector(cluster, "redis"),
            "ports": [service_port("redis", REDIS_PORT, "redis")],
        }
        if cluster_ip is not None:
            spec["clusterIP"] = cluster_ip
            spec["publishNotReadyAddresses"] = True
        out.append(with_spec_hash({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": metadata(cluster, svc_name, "redis", image),
            "spec": spec,
        }))
    return out


def _container(cluster: GpuProxyCluster) -> dict[str, Any]:
    r = cluster.spec.redis
    args = ["redis-server", f"{CONFIG_DIR}/{CONF_FILE}"]
    env: list[dict[str, Any]] = []
    ref = redis_password_ref(cluster)
    if ref is not None:
        # The kubelet expands $(REDIS_PASSWORD) in args; no shell is involved.
        args += ["--requirepass", "$(REDIS_PASSWORD)"]
        secret = {"secretKeyRef": {"name": ref.name, "key": ref.key}}
        # REDISCLI_AUTH lets the readiness probe authenticate without the password in argv.
        env += [
            {"name": "REDIS_PASSWORD", "valueFrom": secret},
            {"name": "REDISCLI_AUTH", "valueFrom": secret},
        ]
    # PING answers LOADING while a snapshot loads, so the pod is only ready once it serves.
    ping = "redis-cli -h 127.0.0.1 -p 6379 ping | grep -q PONG"
    tcp = {"tcpSocket": {"port": "redis"}, "timeoutSeconds": 2}
    container: dict[str, Any] = {
        "name": "redis",
        "image": redis_image(cluster),
        "imagePullPolicy": "IfNotPresent",
        "command": args[:1],
        "args": args[1:],
        "ports": [{"name": "redis", "containerPort": REDIS_PORT, "protocol": "TCP"}],
        "resources": resources(redis_resources(r)),
        "startupProbe": {**tcp, "periodSeconds": 2, "failureThreshold": 30},
        "livenessProbe": {**tcp, "periodSeconds": 10, "failureThreshold": 3},
        "readinessProbe": {
            "exec": {"command": ["sh", "-c", ping]},
            "periodSeconds": 5,
            "timeoutSeconds": 2,
            "failureThreshold": 2,
        },
        "securityContext": container_security_context(REDIS_UID),
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "data", "mountPath": DATA_DIR},
            tmp_mount(),
        ],
    }
    if env:
        container["env"] = env
    return container


def build_redis_statefulset(cluster: GpuProxyCluster) -> Manifest | None:
    r = cluster.spec.redis
    if r.mode != "bundled":
        return None
    name, headless = _names(cluster)
    pod_labels = metadata(cluster, name, "redis", redis_image(cluster))["labels"]
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": name}},
        tmp_volume(),
    ]
    spec: dict[str, Any] = {
        "replicas": 1,
        "serviceName": headless,
        "selector": {"matchLabels": selector(cluster, "redis")},
        "updateStrategy": {"type": "RollingUpdate"},
        "template": {
            "metadata": {
                "labels": pod_labels,
                "annotations": {
                    CONFIG_HASH_ANNOTATION: stable_hash({CONF_FILE: redis_conf(cluster)})
                },
            },
            "spec": {
                "automountServiceAccountToken": False,
                "enableServiceLinks": False,
                "securityContext": pod_security_context(REDIS_UID),
                "containers": [_container(cluster)],
                "volumes": volumes,
            },
        },
    }
    if r.persistence:
        claim: dict[str, Any] = {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": r.storage_size}},
        }
        if r.storage_class_name:
            claim["storageClassName"] = r.storage_class_name
        spec["volumeClaimTemplates"] = [{"metadata": {"name": "data"}, "spec": claim}]
    else:
        # Cache-only: rate-limit windows are short-lived, so losing them on restart is fine.
        volumes.append({"name": "data", "emptyDir": {}})
    return with_spec_hash({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": metadata(cluster, name, "redis", redis_image(cluster)),
        "spec": spec,
    })
