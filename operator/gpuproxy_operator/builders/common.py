"""Helpers every builder shares: metadata (labels, owner reference), hashing and the
hardened security contexts of pods and containers."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from gpuproxy_operator.api.base import Resources
from gpuproxy_operator.api.cluster import GpuProxyCluster
from gpuproxy_operator.naming import (
    SPEC_HASH_ANNOTATION,
    Component,
    common_labels,
    selector_labels,
)

Manifest = dict[str, Any]

# A label value: at most 63 characters of [A-Za-z0-9_.-], starting and ending alphanumeric.
_LABEL_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def stable_hash(value: Any) -> str:
    """sha256 of canonical JSON (sorted keys, no whitespace): equal input, equal hash."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def image_version(image: str) -> str:
    """The image tag as a valid label value; a digest-only image gives `sha256-<12 hex>`,
    an image with neither tag nor digest `latest`."""
    ref, _, digest = image.partition("@")
    if ":" in ref.rsplit("/", 1)[-1]:
        version = ref.rsplit(":", 1)[1]
    elif digest:
        version = digest.replace(":", "-")[:19]
    else:
        version = "latest"
    cleaned = _LABEL_UNSAFE.sub("-", version)[:63].strip("-_.")
    return cleaned or "latest"


def labels(cluster: GpuProxyCluster, component: Component, image: str) -> dict[str, str]:
    """The recommended labels of one component's objects, versioned by its image tag."""
    return common_labels(cluster.metadata.name, component, image_version(image))


def selector(cluster: GpuProxyCluster, component: Component) -> dict[str, str]:
    return selector_labels(cluster.metadata.name, component)


def owner_reference(cluster: GpuProxyCluster) -> dict[str, Any]:
    """Makes the CR the controller of the child, so deleting the CR garbage-collects it."""
    return {
        "apiVersion": cluster.api_version,
        "kind": cluster.kind,
        "name": cluster.metadata.name,
        "uid": cluster.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(
    cluster: GpuProxyCluster,
    name: str,
    component: Component,
    image: str,
    annotations: dict[str, str] | None = None,
    extra_labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Object metadata; user-supplied maps are sorted so their input order never matters."""
    return {
        "name": name,
        "namespace": cluster.metadata.namespace,
        "labels": {**sorted_map(extra_labels or {}), **labels(cluster, component, image)},
        "annotations": sorted_map(annotations or {}),
        "ownerReferences": [owner_reference(cluster)],
    }


def sorted_map(mapping: Mapping[str, str]) -> dict[str, str]:
    return dict(sorted(mapping.items()))


def resources(spec: Resources) -> dict[str, dict[str, str]]:
    return {kind: sorted_map(amounts) for kind, amounts in spec.to_k8s().items()}


def with_spec_hash(manifest: Manifest, *, ignore_replicas: bool = False) -> Manifest:
    """Stamp SPEC_HASH_ANNOTATION: the hash of the body without that annotation, without a
    Secret's data, and without `spec.replicas` when an autoscaler owns it (so scaling alone
    never looks like drift)."""
    # A JSON round trip drops shared sub-objects (YAML would print them as &anchors).
    manifest = json.loads(json.dumps(manifest))
    body = json.loads(json.dumps(manifest))
    body["metadata"].get("annotations", {}).pop(SPEC_HASH_ANNOTATION, None)
    if ignore_replicas:
        body.get("spec", {}).pop("replicas", None)
    if body.get("kind") == "Secret":
        # Annotations are readable by more people than Secret data (and a plain hash of a
        # password can be brute-forced offline): a Secret's data stays out of its hash. The
        # planner compares the data itself (reconcile.contains) to notice a change.
        for data_field in ("data", "stringData"):
            body.pop(data_field, None)
    manifest["metadata"].setdefault("annotations", {})[SPEC_HASH_ANNOTATION] = stable_hash(body)
    return manifest


def pod_security_context(
    uid: int, sysctls: dict[str, str] | None = None, *, fs_group: bool = True
) -> dict[str, Any]:
    context: dict[str, Any] = {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if fs_group:
        context["fsGroup"] = uid
    if sysctls:
        context["sysctls"] = [{"name": k, "value": v} for k, v in sorted(sysctls.items())]
    return context


def container_security_context(uid: int) -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def tmp_volume(name: str = "tmp", size: str = "64Mi") -> dict[str, Any]:
    """A small writable scratch dir, since every root filesystem is read-only."""
    return {"name": name, "emptyDir": {"sizeLimit": size}}


def tmp_mount(name: str = "tmp") -> dict[str, Any]:
    # A per-pod emptyDir, not the node's shared /tmp.
    return {"name": name, "mountPath": "/tmp"}  # noqa: S108


def service_port(name: str, port: int, target: int | str) -> dict[str, Any]:
    return {"name": name, "port": port, "targetPort": target, "protocol": "TCP"}
