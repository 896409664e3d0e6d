"""The operands' images: the spec's when it names one, else the operator's own defaults (the
chart sets them from its values), so an operator upgrade upgrades every cluster that does
not pin an image."""

from __future__ import annotations

from dataclasses import dataclass

from gpuproxy_operator.api.cluster import GpuProxyCluster

DEFAULT_PROXY_IMAGE = "aiserve/gpuproxy-proxy:0.1.0"
DEFAULT_PGBOUNCER_IMAGE = "edoburu/pgbouncer:v1.24.1-p1"
DEFAULT_REDIS_IMAGE = "redis:7.4-alpine"
# pg_dump must be at least as new as the server: the newest major dumps every older one.
DEFAULT_BACKUP_IMAGE = "postgres:17-alpine"

# What older CRDs defaulted into every stored cluster: the CRD wrote them, not the user, so
# they count as unset (else those clusters would stay on these images forever).
LEGACY_CRD_DEFAULTS = frozenset({DEFAULT_PROXY_IMAGE, DEFAULT_PGBOUNCER_IMAGE,
                                 DEFAULT_REDIS_IMAGE})


@dataclass(frozen=True)
class OperandImages:
    """The operator's default image of each component (env GPUPROXY_*_IMAGE)."""

    proxy: str = DEFAULT_PROXY_IMAGE
    pgbouncer: str = DEFAULT_PGBOUNCER_IMAGE
    redis: str = DEFAULT_REDIS_IMAGE
    backup: str = DEFAULT_BACKUP_IMAGE


def _chosen(spec_image: str | None, default: str) -> str:
    if spec_image is None or spec_image in LEGACY_CRD_DEFAULTS:
        return default
    return spec_image


def with_images(cluster: GpuProxyCluster, images: OperandImages) -> GpuProxyCluster:
    """`cluster` with every image field set to the image its children run."""
    spec = cluster.spec
    new_spec = spec.model_copy(update={
        "proxy": spec.proxy.model_copy(
            update={"image": _chosen(spec.proxy.image, images.proxy)}),
        "pgbouncer": spec.pgbouncer.model_copy(
            update={"image": _chosen(spec.pgbouncer.image, images.pgbouncer)}),
        "redis": spec.redis.model_copy(
            update={"image": _chosen(spec.redis.image, images.redis)}),
        "database": spec.database.model_copy(update={"backup": spec.database.backup.model_copy(
            update={"image": _chosen(spec.database.backup.image, images.backup)})}),
    })
    return cluster.model_copy(update={"spec": new_spec})


def proxy_image(cluster: GpuProxyCluster) -> str:
    """The proxy image; build_all has filled the operator's default in (a builder called on
    its own falls back to the built-in one)."""
    return cluster.spec.proxy.image or DEFAULT_PROXY_IMAGE


def pgbouncer_image(cluster: GpuProxyCluster) -> str:
    return cluster.spec.pgbouncer.image or DEFAULT_PGBOUNCER_IMAGE


def redis_image(cluster: GpuProxyCluster) -> str:
    return cluster.spec.redis.image or DEFAULT_REDIS_IMAGE


def backup_image(cluster: GpuProxyCluster) -> str:
    return cluster.spec.database.backup.image or DEFAULT_BACKUP_IMAGE
