"""PgBouncer in transaction pooling mode: ConfigMap (pgbouncer.ini and the entrypoint that
reloads it), userlist Secret, Deployment of two spread pods, their PodDisruptionBudget and
Service."""

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
    tmp_mount,
    tmp_volume,
    with_spec_hash,
)
from gpuproxy_operator.builders.images import pgbouncer_image
from gpuproxy_operator.builders.inputs import DatabaseCredentials
from gpuproxy_operator.builders.pgbouncer_config import (
    AUTH_DIR,
    CONFIG_DIR,
    INI_FILE,
    USERLIST_FILE,
    pgbouncer_ini,
    userlist,
    userlist_secret_data,
)
from gpuproxy_operator.builders.pgbouncer_reload import RUN_SCRIPT, RUN_SCRIPT_FILE, restart_hash
from gpuproxy_operator.builders.proxy_config import PGBOUNCER_PORT
from gpuproxy_operator.naming import CONFIG_HASH_ANNOTATION, child_name
from gpuproxy_operator.sizing import pgbouncer_resources

__all__ = ["build_pgbouncer_configmap", "build_pgbouncer_deployment", "build_pgbouncer_pdb",
           "build_pgbouncer_secret", "build_pgbouncer_service", "userlist"]

# The postgres user of the Alpine-based pgbouncer images.
PGBOUNCER_UID = 70


def build_pgbouncer_configmap(cluster: GpuProxyCluster) -> Manifest:
    name = child_name(cluster.metadata.name, "pgbouncer")
    return with_spec_hash({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(cluster, name, "pgbouncer", pgbouncer_image(cluster)),
        "data": {INI_FILE: pgbouncer_ini(cluster), RUN_SCRIPT_FILE: RUN_SCRIPT},
    })


def build_pgbouncer_secret(
    cluster: GpuProxyCluster, credentials: DatabaseCredentials | None
) -> Manifest | None:
    if credentials is None:
        return None
    name = child_name(cluster.metadata.name, "pgbouncer")
    return with_spec_hash({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(cluster, name, "pgbouncer", pgbouncer_image(cluster)),
        "type": "Opaque",
        "data": userlist_secret_data(cluster, credentials),
    })


def build_pgbouncer_service(cluster: GpuProxyCluster) -> Manifest:
    name = child_name(cluster.metadata.name, "pgbouncer")
    return with_spec_hash({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(cluster, name, "pgbouncer", pgbouncer_image(cluster)),
        "spec": {
            "type": "ClusterIP",
            "selector": selector(cluster, "pgbouncer"),
            "ports": [service_port("pgbouncer", PGBOUNCER_PORT, "pgbouncer")],
        },
    })


def _tcp_probe(period: int, failures: int) -> dict[str, Any]:
    return {
        "tcpSocket": {"port": "pgbouncer"},
        "periodSeconds": period,
        "timeoutSeconds": 2,
        "failureThreshold": failures,
    }


def _spread(cluster: GpuProxyCluster) -> dict[str, Any]:
    """Preferably one pod per node, spread over zones: a node drain or zone outage leaves the
    other pod serving (preferred, so a one-node cluster still runs both)."""
    match = {"matchLabels": selector(cluster, "pgbouncer")}
    return {
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 100,
             "podAffinityTerm": {"labelSelector": match,
                                 "topologyKey": "kubernetes.io/hostname"}},
        ]}},
        "topologySpreadConstraints": [{
            "maxSkew": 1,
            "topologyKey": "topology.kubernetes.io/zone",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": match,
        }],
    }


def _pod_spec(cluster: GpuProxyCluster) -> dict[str, Any]:
    pb = cluster.spec.pgbouncer
    name = child_name(cluster.metadata.name, "pgbouncer")
    return {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(PGBOUNCER_UID),
        "containers": [
            {
                "name": "pgbouncer",
                "image": pgbouncer_image(cluster),
                "imagePullPolicy": "IfNotPresent",
                # Not the image's entrypoint, which would generate its own config: ours
                # reloads pgbouncer when the kubelet updates the ini or the userlist.
                "command": ["/bin/sh", f"{CONFIG_DIR}/{RUN_SCRIPT_FILE}",
                            f"{CONFIG_DIR}/{INI_FILE}", f"{AUTH_DIR}/{USERLIST_FILE}"],
                "ports": [
                    {"name": "pgbouncer", "containerPort": PGBOUNCER_PORT, "protocol": "TCP"}
                ],
                "resources": resources(pgbouncer_resources(pb)),
                "startupProbe": _tcp_probe(2, 30),
                "livenessProbe": _tcp_probe(10, 3),
                "readinessProbe": _tcp_probe(5, 2),
                "securityContext": container_security_context(PGBOUNCER_UID),
                # Whole-volume mounts, no subPath: the kubelet then replaces the files in
                # place when the ConfigMap or Secret changes.
                "volumeMounts": [
                    {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                    {"name": "userlist", "mountPath": AUTH_DIR, "readOnly": True},
                    tmp_mount(),
                ],
            }
        ],
        "volumes": [
            {"name": "config", "configMap": {"name": name}},
            {"name": "userlist", "secret": {"secretName": name, "defaultMode": 0o440}},
            tmp_volume(),
        ],
        **_spread(cluster),
    }


def build_pgbouncer_deployment(cluster: GpuProxyCluster) -> Manifest:
    """The config hash covers only what a reload cannot apply (pgbouncer_reload.restart_key):
    pool settings and a password rotation reach the running pods by SIGHUP, without a roll."""
    pb = cluster.spec.pgbouncer
    name = child_name(cluster.metadata.name, "pgbouncer")
    pod_labels = metadata(cluster, name, "pgbouncer", pgbouncer_image(cluster))["labels"]
    return with_spec_hash({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(cluster, name, "pgbouncer", pgbouncer_image(cluster)),
        "spec": {
            "replicas": pb.replicas,
            "selector": {"matchLabels": selector(cluster, "pgbouncer")},
            # A new pod is ready before an old one goes: capacity never dips during a roll.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    "annotations": {CONFIG_HASH_ANNOTATION: restart_hash(cluster)},
                },
                "spec": _pod_spec(cluster),
            },
        },
    })


def build_pgbouncer_pdb(cluster: GpuProxyCluster) -> Manifest:
    """At most one PgBouncer pod down for voluntary disruptions (node drains): with the default
    two, one always serves. maxUnavailable rather than minAvailable, so a single replica never
    blocks a drain."""
    return with_spec_hash({
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(cluster, child_name(cluster.metadata.name, "pgbouncer"),
                             "pgbouncer", pgbouncer_image(cluster)),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector(cluster, "pgbouncer")},
        },
    })
