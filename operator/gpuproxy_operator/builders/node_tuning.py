"""Node tuning: a ConfigMap with the guide's 99-gpuproxy-100k.conf and a DaemonSet whose
privileged init container applies it to each node's network namespace."""

from __future__ import annotations

from typing import Any

from gpuproxy_operator.api.cluster import GpuProxyCluster
from gpuproxy_operator.builders.common import (
    Manifest,
    container_security_context,
    metadata,
    pod_security_context,
    selector,
    stable_hash,
    with_spec_hash,
)
from gpuproxy_operator.naming import CONFIG_HASH_ANNOTATION, child_name

SYSCTL_FILE = "99-gpuproxy-100k.conf"
SYSCTL_DIR = "/etc/gpuproxy-sysctl"
NOBODY_UID = 65534
SLEEP_FOREVER = "2147483647"


def sysctl_conf(cluster: GpuProxyCluster) -> str:
    """`key = value` lines, sorted so the file (and its hash) does not depend on input order."""
    sysctls = cluster.spec.node_tuning.sysctls
    return "".join(f"{key} = {sysctls[key]}\n" for key in sorted(sysctls))


# Readiness: every line of the mounted file is still in force on the node (something else
# may reset a setting). `echo $(...)` squeezes the tabs the kernel prints between values.
VERIFY_SCRIPT = f"""\
while read -r key _ value; do
  [ -n "$key" ] || continue
  got="$(echo $(sysctl -n "$key"))"
  [ "$got" = "$(echo $value)" ] || {{ echo "$key is '$got', want '$value'"; exit 1; }}
done < {SYSCTL_DIR}/{SYSCTL_FILE}
"""


def build_node_tuning_configmap(cluster: GpuProxyCluster) -> Manifest | None:
    nt = cluster.spec.node_tuning
    if not nt.enabled:
        return None
    return with_spec_hash({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(
            cluster, child_name(cluster.metadata.name, "node-tuning"), "node-tuning", nt.image
        ),
        "data": {SYSCTL_FILE: sysctl_conf(cluster)},
    })


def _init_container(cluster: GpuProxyCluster) -> dict[str, Any]:
    """The one privileged container of the stack: writing net.* sysctls of the host's
    network namespace needs it. It runs `sysctl -p` once and exits."""
    return {
        "name": "apply-sysctls",
        "image": cluster.spec.node_tuning.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["sysctl", "-p", f"{SYSCTL_DIR}/{SYSCTL_FILE}"],
        "resources": {
            "requests": {"cpu": "10m", "memory": "16Mi"},
            "limits": {"cpu": "100m", "memory": "32Mi"},
        },
        "securityContext": {
            "privileged": True,
            "runAsNonRoot": False,
            "runAsUser": 0,
            "readOnlyRootFilesystem": True,
        },
        "volumeMounts": [{"name": "sysctls", "mountPath": SYSCTL_DIR, "readOnly": True}],
    }


def _main_container(cluster: GpuProxyCluster) -> dict[str, Any]:
    """Keeps the pod alive (so the DaemonSet re-applies on a new node or a config change)."""
    return {
        "name": "pause",
        "image": cluster.spec.node_tuning.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["sleep", SLEEP_FOREVER],
        "resources": {
            "requests": {"cpu": "1m", "memory": "4Mi"},
            "limits": {"cpu": "10m", "memory": "16Mi"},
        },
        "readinessProbe": {
            "exec": {"command": ["sh", "-c", VERIFY_SCRIPT]},
            "periodSeconds": 60,
            "timeoutSeconds": 5,
            "failureThreshold": 1,
        },
        "livenessProbe": {
            "exec": {"command": ["test", "-r", f"{SYSCTL_DIR}/{SYSCTL_FILE}"]},
            "periodSeconds": 60,
            "timeoutSeconds": 5,
        },
        "securityContext": container_security_context(NOBODY_UID),
        "volumeMounts": [{"name": "sysctls", "mountPath": SYSCTL_DIR, "readOnly": True}],
    }


def build_node_tuning_daemonset(cluster: GpuProxyCluster) -> Manifest | None:
    nt = cluster.spec.node_tuning
    if not nt.enabled:
        return None
    name = child_name(cluster.metadata.name, "node-tuning")
    pod: dict[str, Any] = {
        # net.* sysctls are per network namespace: only the host's own reaches the node.
        "hostNetwork": True,
        "dnsPolicy": "ClusterFirstWithHostNet",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(NOBODY_UID, fs_group=False),
        "initContainers": [_init_container(cluster)],
        "containers": [_main_container(cluster)],
        "volumes": [{"name": "sysctls", "configMap": {"name": name}}],
        "terminationGracePeriodSeconds": 5,
    }
    if nt.node_selector:
        pod["nodeSelector"] = dict(sorted(nt.node_selector.items()))
    if nt.tolerations:
        pod["tolerations"] = [t.to_k8s() for t in nt.tolerations]
    return with_spec_hash({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": metadata(cluster, name, "node-tuning", nt.image),
        "spec": {
            "selector": {"matchLabels": selector(cluster, "node-tuning")},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {
                    "labels": metadata(cluster, name, "node-tuning", nt.image)["labels"],
                    "annotations": {
                        CONFIG_HASH_ANNOTATION: stable_hash({SYSCTL_FILE: sysctl_conf(cluster)})
                    },
                },
                "spec": pod,
            },
        },
    })
