"""The proxy workload: its config ConfigMap and the hardened Deployment that mounts it and its
secrets as files."""

from __future__ import annotations

from typing import Any

import yaml

from gpuproxy_operator.api.cluster import GpuProxyCluster
from gpuproxy_operator.builders.common import (
    Manifest,
    container_security_context,
    metadata,
    pod_security_context,
    resources,
    selector,
    stable_hash,
    tmp_mount,
    tmp_volume,
    with_spec_hash,
)
from gpuproxy_operator.builders.images import proxy_image
from gpuproxy_operator.builders.proxy_config import (
    SPOOL_DIR,
    admin_api_port,
    build_proxy_config,
    spool_size_limit,
    termination_grace_seconds,
)
from gpuproxy_operator.builders.proxy_secrets import secret_volume_mounts, secret_volumes
from gpuproxy_operator.naming import CONFIG_HASH_ANNOTATION, child_name
from gpuproxy_operator.sizing import proxy_resources
from gpuproxy_operator.sysctls import proxy_pod_sysctls
from gpuproxy_proxy.config import ProxyConfig, restart_key

PROXY_UID = 10001
# Its own directory: the secrets mount beside it under /etc/gpuproxy/secrets, not inside the
# read-only ConfigMap volume (a mount point there could not be created).
CONFIG_DIR = "/etc/gpuproxy/config"
CONFIG_FILE = "config.yaml"


def proxy_config_data(cluster: GpuProxyCluster) -> dict[str, str]:
    text = yaml.safe_dump(build_proxy_config(cluster), sort_keys=True, default_flow_style=False)
    return {CONFIG_FILE: text}


def config_hash(cluster: GpuProxyCluster) -> str:
    """Hash of what a running proxy cannot reload (restart_key): only a change to that rolls
    the pods; backends, strategy, timeouts and the like reach them through the ConfigMap."""
    config = ProxyConfig.model_validate(build_proxy_config(cluster))
    return stable_hash(restart_key(config))


def build_proxy_configmap(cluster: GpuProxyCluster) -> Manifest:
    image = proxy_image(cluster)
    return with_spec_hash({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(cluster, child_name(cluster.metadata.name, "proxy"), "proxy", image),
        "data": proxy_config_data(cluster),
    })


def desired_replicas(cluster: GpuProxyCluster, decided: int | None) -> int:
    """`decided` as is (reconcile's replica owner: the count to keep or to create with; the
    autoscaler paces any clamp itself), else spec.proxy.replicas, within [minReplicas,
    maxReplicas] while autoscaling (what `render` shows)."""
    if decided is not None:
        return decided
    replicas = cluster.spec.proxy.replicas
    auto = cluster.spec.autoscaling
    if auto.enabled:
        replicas = min(max(replicas, auto.min_replicas), auto.max_replicas)
    return replicas


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "admin"},
        "periodSeconds": period,
        "timeoutSeconds": 2,
        "failureThreshold": failures,
    }


def _container(cluster: GpuProxyCluster) -> dict[str, Any]:
    proxy = cluster.spec.proxy
    return {
        "name": "proxy",
        "image": proxy_image(cluster),
        "imagePullPolicy": proxy.image_pull_policy,
        "args": ["--config", f"{CONFIG_DIR}/{CONFIG_FILE}"],
        "ports": [
            {"name": "http", "containerPort": proxy.port, "protocol": "TCP"},
            {"name": "admin", "containerPort": proxy.admin_port, "protocol": "TCP"},
            *([{"name": "admin-api", "containerPort": api_port, "protocol": "TCP"}]
              if (api_port := admin_api_port(cluster)) is not None else []),
        ],
        "resources": resources(proxy_resources(proxy)),
        # Startup allows 60 s for workers to spawn. Liveness is /health, the workers'
        # heartbeats: only a hung process is restarted. Readiness is /ready: process, workers
        # and config, not the database or Redis, whose outage restarts would not cure.
        "startupProbe": _probe("/health", 2, 30),
        "livenessProbe": _probe("/health", 10, 3),
        "readinessProbe": _probe("/ready", 5, 2),
        # No preStop sleep: on SIGTERM the proxy itself keeps serving for drainDelaySeconds
        # while /ready fails, so endpoints and load balancers drop the pod before its listener
        # closes; a sleep here would only delay the SIGTERM and use up the grace period.
        "securityContext": container_security_context(PROXY_UID),
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            *secret_volume_mounts(cluster),
            tmp_mount(),
            {"name": "metering-spool", "mountPath": SPOOL_DIR},
        ],
    }


def _topology_spread(cluster: GpuProxyCluster) -> list[dict[str, Any]]:
    proxy = cluster.spec.proxy
    if proxy.topology_spread_constraints:
        return [dict(c) for c in proxy.topology_spread_constraints]
    match = {"matchLabels": selector(cluster, "proxy")}
    return [
        {
            "maxSkew": 1,
            "topologyKey": key,
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": match,
        }
        for key in ("kubernetes.io/hostname", "topology.kubernetes.io/zone")
    ]


def _pod_spec(cluster: GpuProxyCluster) -> dict[str, Any]:
    proxy = cluster.spec.proxy
    # The per-netns settings a node DaemonSet cannot give pods (each has its own network
    # namespace): the safe ones, which every kubelet allows, set on the pod itself.
    sysctls = proxy_pod_sysctls()
    pod: dict[str, Any] = {
        "serviceAccountName": child_name(cluster.metadata.name, "proxy"),
        # A token only for backend discovery (the proxy's own EndpointSlice watch); the
        # ServiceAccount itself mounts none, so no other pod gets one by accident.
        "automountServiceAccountToken": bool(proxy.backend_discovery),
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": termination_grace_seconds(proxy),
        "securityContext": pod_security_context(PROXY_UID, sysctls),
        "containers": [_container(cluster)],
        "volumes": [
            {
                "name": "config",
                "configMap": {"name": child_name(cluster.metadata.name, "proxy")},
            },
            *secret_volumes(cluster),
            tmp_volume(),
            tmp_volume("metering-spool", spool_size_limit(proxy.metering.spool_size_mib)),
        ],
        "topologySpreadConstraints": _topology_spread(cluster),
    }
    if proxy.node_selector:
        pod["nodeSelector"] = dict(sorted(proxy.node_selector.items()))
    if proxy.tolerations:
        pod["tolerations"] = [t.to_k8s() for t in proxy.tolerations]
    if proxy.affinity:
        pod["affinity"] = dict(proxy.affinity)
    if proxy.priority_class_name:
        pod["priorityClassName"] = proxy.priority_class_name
    if proxy.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": n} for n in proxy.image_pull_secrets]
    return pod


def build_proxy_deployment(cluster: GpuProxyCluster, replicas: int | None = None) -> Manifest:
    """The proxy Deployment; `replicas` is the autoscaler's decision (not in the spec hash)."""
    proxy = cluster.spec.proxy
    name = child_name(cluster.metadata.name, "proxy")
    pod_meta = metadata(cluster, name, "proxy", proxy_image(cluster))
    annotations = {
        **proxy.pod_annotations,
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(proxy.admin_port),
        "prometheus.io/path": "/metrics",
        CONFIG_HASH_ANNOTATION: config_hash(cluster),
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(cluster, name, "proxy", proxy_image(cluster)),
        "spec": {
            "replicas": desired_replicas(cluster, replicas),
            "selector": {"matchLabels": selector(cluster, "proxy")},
            "strategy": {
                "type": "RollingUpdate",
                # Never drop below the current capacity: 100k connections per pod are at stake.
                "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 0},
            },
            "template": {
                "metadata": {
                    "labels": pod_meta["labels"],
                    "annotations": dict(sorted(annotations.items())),
                },
                "spec": _pod_spec(cluster),
            },
        },
    }
    return with_spec_hash(deployment, ignore_replicas=True)
