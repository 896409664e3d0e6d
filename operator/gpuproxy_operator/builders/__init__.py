"""Pure builders: (GpuProxyCluster, BuildInputs) -> every child manifest as a dict.
No I/O and no clock; equal input gives byte-identical output."""

from __future__ import annotations

from gpuproxy_operator.api.cluster import GpuProxyCluster
from gpuproxy_operator.builders.backup import build_backup_cronjob, build_backup_network_policy
from gpuproxy_operator.builders.common import Manifest
from gpuproxy_operator.builders.images import OperandImages, with_images
from gpuproxy_operator.builders.inputs import BuildInputs, DatabaseCredentials, OperatorPeer
from gpuproxy_operator.builders.monitoring import build_prometheus_rule, build_service_monitor
from gpuproxy_operator.builders.network_policies import (
    build_pgbouncer_network_policy,
    build_proxy_network_policy,
    build_redis_network_policy,
)
from gpuproxy_operator.builders.pgbouncer import (
    build_pgbouncer_configmap,
    build_pgbouncer_deployment,
    build_pgbouncer_pdb,
    build_pgbouncer_secret,
    build_pgbouncer_service,
)
from gpuproxy_operator.builders.proxy import build_proxy_configmap, build_proxy_deployment
from gpuproxy_operator.builders.proxy_rbac import (
    build_proxy_discovery_role,
    build_proxy_discovery_role_binding,
)
from gpuproxy_operator.builders.proxy_services import (
    build_proxy_metrics_service,
    build_proxy_pdb,
    build_proxy_service,
    build_proxy_service_account,
)
from gpuproxy_operator.builders.redis import (
    build_redis_configmap,
    build_redis_services,
    build_redis_statefulset,
)

__all__ = ["BuildInputs", "DatabaseCredentials", "Manifest", "OperandImages", "OperatorPeer",
           "build_all"]


def build_all(cluster: GpuProxyCluster, inputs: BuildInputs) -> list[Manifest]:
    """Every child manifest in apply order: ServiceAccount, its Role and RoleBinding (backend
    discovery only), ConfigMaps, Secrets, Services,
    workloads, PodDisruptionBudget, NetworkPolicies, the backup CronJob, then the
    prometheus-operator objects (last, since their CRDs may be missing and must not block the
    rest). Node tuning is not among them: it is the platform's (the chart's DaemonSet), never
    a cluster's child."""
    cluster = with_images(cluster, inputs.images)
    bundled_redis = cluster.spec.redis.mode == "bundled"
    candidates: list[Manifest | None] = [
        build_proxy_service_account(cluster),
        build_proxy_discovery_role(cluster),
        build_proxy_discovery_role_binding(cluster),
        build_proxy_configmap(cluster),
        build_pgbouncer_configmap(cluster),
        build_redis_configmap(cluster) if bundled_redis else None,
        build_pgbouncer_secret(cluster, inputs.database_credentials),
        build_proxy_service(cluster),
        build_proxy_metrics_service(cluster),
        build_pgbouncer_service(cluster),
        *(build_redis_services(cluster) if bundled_redis else []),
        build_redis_statefulset(cluster),
        build_pgbouncer_deployment(cluster),
        build_proxy_deployment(cluster, inputs.proxy_replicas),
        build_proxy_pdb(cluster),
        build_pgbouncer_pdb(cluster),
        build_proxy_network_policy(cluster, inputs.operator),
        build_redis_network_policy(cluster),
        build_pgbouncer_network_policy(cluster),
        build_backup_network_policy(cluster),
        build_backup_cronjob(cluster),
        build_prometheus_rule(cluster),
        build_service_monitor(cluster),
    ]
    return [m for m in candidates if m is not None]
