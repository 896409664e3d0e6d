"""The Redis password: the spec's Secret, or for the bundled Redis without one a Secret the
operator generates once. Builders only reference it by name; the random value is made by the
reconcile, and only while that Secret does not exist (never regenerated)."""

from __future__ import annotations

import base64

from gpuproxy_operator.api.base import SecretKeyRef
from gpuproxy_operator.api.cluster import GpuProxyCluster
from gpuproxy_operator.builders.common import Manifest, metadata, with_spec_hash
from gpuproxy_operator.builders.images import redis_image
from gpuproxy_operator.naming import GENERATED_ONCE_ANNOTATION, child_name

GENERATED_KEY = "password"


def generated_secret_name(cluster: GpuProxyCluster) -> str:
    return child_name(cluster.metadata.name, "redis", "auth")


def needs_generated_secret(cluster: GpuProxyCluster) -> bool:
    redis = cluster.spec.redis
    return redis.mode == "bundled" and redis.password_secret_ref is None


def redis_password_ref(cluster: GpuProxyCluster) -> SecretKeyRef | None:
    """The Secret key holding the Redis password; None: an external Redis without one."""
    if needs_generated_secret(cluster):
        return SecretKeyRef(name=generated_secret_name(cluster), key=GENERATED_KEY)
    return cluster.spec.redis.password_secret_ref


def build_generated_redis_secret(cluster: GpuProxyCluster, password: str) -> Manifest:
    """The generated password Secret, owned by the cluster (deleted with it)."""
    encoded = base64.b64encode(password.encode()).decode()
    meta = metadata(cluster, generated_secret_name(cluster), "redis", redis_image(cluster),
                    annotations={GENERATED_ONCE_ANNOTATION: "true"})
    return with_spec_hash({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta,
        "type": "Opaque",
        "data": {GENERATED_KEY: encoded},
    })
