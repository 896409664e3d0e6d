"""The pure capacity plan for a connection target: proxy replicas, file descriptors and memory
per replica, PgBouncer server connections, Redis memory, each component's resources, node
sysctls, and warnings. The measured figures live in `gpuproxy_operator.sizing`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from gpuproxy_operator.api.base import Resources
from gpuproxy_operator.api.cluster import GpuProxyClusterSpec
from gpuproxy_operator.api.proxy import SHUTDOWN_MARGIN_SECONDS
from gpuproxy_operator.autoscaling.policy import per_replica_target, replica_bounds
from gpuproxy_operator.sizing import (
    KERNEL_KIB_PER_SOCKET,
    MEMORY_SOURCE,
    REDIS_BYTES_PER_KEY,
    REDIS_KEYS_PER_CLIENT,
    USER_KIB_PER_CONNECTION,
    pgbouncer_resources,
    proxy_memory_bytes,
    proxy_resources,
    quantity_bytes,
    redis_bytes,
    redis_resources,
)
from gpuproxy_operator.sysctls import NODE_TUNING_SYSCTLS

__all__ = ["KERNEL_KIB_PER_SOCKET", "MEMORY_SOURCE", "USER_KIB_PER_CONNECTION", "ComponentSize",
           "Plan", "plan", "quantity_bytes", "redis_bytes"]

# PostgreSQL max_connections in the deployment guide (PgBouncer fans in to at most this).
GUIDE_PG_MAX_CONNECTIONS = 500
PG_SUPERUSER_RESERVED = 3  # PostgreSQL's default superuser_reserved_connections
# Open files per process in the guide (limits.conf / LimitNOFILE); container runtimes usually
# give 1048576.
GUIDE_NOFILE = 1_000_000
# Per-process file descriptors besides sockets (listeners, pools, logs, Python itself).
FD_BASE = 1024
# The proxy's database.pool_max_size default per worker (the operator does not override it).
PROXY_DB_POOL_PER_WORKER = 10
# Kernel settings the guide's file lacks but 1M connections through a Service need.
@dataclass(frozen=True)
class ComponentSize:
    """What one component's pods request, for the plan's resources table."""

    name: str
    pods: int
    requests: dict[str, str]
    limits: dict[str, str]
    derived: bool  # from the sizing model (spec resources unset), not the spec


def _size(name: str, pods: int, resources: Resources, given: Resources | None) -> ComponentSize:
    derived = given is None or not (given.requests or given.limits)
    return ComponentSize(name, pods, dict(resources.requests), dict(resources.limits), derived)


@dataclass(frozen=True)
class Plan:
    """Numbers for one target; every field is explained by `commands/plan.py`'s output."""

    connections: int
    replicas: int  # to hold `connections` at the target utilisation (within the bounds)
    replicas_unbounded: int
    connections_per_replica: int
    target_per_replica: float
    connections_at_plan: float  # per replica, at `replicas`
    workers: int
    fds_per_replica: int
    fds_per_worker: int
    memory_per_replica_bytes: int
    memory_limit_bytes: int | None
    pgbouncer_server_connections: int
    pg_max_connections: int
    pgbouncer_client_capacity: int
    proxy_db_clients: int  # proxy DB pool connections into PgBouncer at `replicas`
    redis_bytes: int
    redis_maxmemory_bytes: int
    sysctls_missing: dict[str, str]
    # Off is a documented choice (nodes tuned through their image), so the missing sysctls
    # are listed for whoever tunes the nodes rather than raised as a warning.
    node_tuning: bool
    warnings: list[str] = field(default_factory=list)
    # What each component's pods request and may use (the spec's resources, or derived).
    resources: list[ComponentSize] = field(default_factory=list)


def plan(spec: GpuProxyClusterSpec, connections: int) -> Plan:
    proxy, auto, pgb = spec.proxy, spec.autoscaling, spec.pgbouncer
    cpr = proxy.connections_per_replica
    target = per_replica_target(auto, cpr)
    unbounded = max(1, math.ceil(connections / target))
    warnings: list[str] = []
    if auto.enabled:
        lower, _ = replica_bounds(auto, cpr)
        replicas = min(max(unbounded, lower), auto.max_replicas)
        if auto.max_replicas * cpr < connections:
            warnings.append(
                f"spec.autoscaling.maxReplicas {auto.max_replicas} x "
                f"spec.proxy.connectionsPerReplica {cpr} = {auto.max_replicas * cpr} < "
                f"{connections}: raise maxReplicas to at least {math.ceil(connections / cpr)} "
                f"({unbounded} to keep {auto.headroom_percent}% headroom)")
        elif auto.max_replicas < unbounded:
            warnings.append(
                f"at {connections} connections the {auto.max_replicas} replicas of "
                f"spec.autoscaling.maxReplicas run above the {100 - auto.headroom_percent}% "
                f"utilisation target (no headroom); {unbounded} keep it")
        if auto.target_connections < connections:
            warnings.append(
                f"spec.autoscaling.targetConnections {auto.target_connections} < {connections}:"
                " the autoscaler never scales beyond what targetConnections needs; raise it")
    else:
        replicas = proxy.replicas
        if replicas * cpr < connections:
            warnings.append(
                f"autoscaling is off and spec.proxy.replicas {replicas} x {cpr} = "
                f"{replicas * cpr} < {connections}: set replicas to {unbounded} or enable "
                "spec.autoscaling")
    per_replica = connections / max(replicas, 1)

    # Every client connection is a socket; a streaming request holds a second one upstream.
    sockets = 2 * cpr
    upstream_pool = proxy.upstream.max_connections_per_backend * len(proxy.backends)
    fds_worker = math.ceil(sockets / proxy.workers) + upstream_pool + FD_BASE
    fds_replica = fds_worker * proxy.workers
    if fds_worker > GUIDE_NOFILE:
        warnings.append(
            f"{fds_worker} open files per worker exceed the {GUIDE_NOFILE} nofile limit: raise "
            "spec.proxy.workers or lower connectionsPerReplica")
    memory = proxy_memory_bytes(proxy.workers, cpr, tls=proxy.tls is not None)
    proxy_res = proxy_resources(proxy)
    limit = quantity_bytes(proxy_res.limits.get("memory", ""))
    if limit is not None and limit < memory:
        warnings.append(
            f"spec.proxy.resources.limits.memory {proxy_res.limits['memory']} is below "
            f"the ~{memory / 1024**3:.1f} GiB {proxy.workers} idle worker processes and {cpr} "
            f"connections need ({MEMORY_SOURCE})")
    grace = proxy.termination_grace_period_seconds
    needed = (proxy.shutdown.drain_delay_seconds + proxy.upstream.max_request_seconds
              + SHUTDOWN_MARGIN_SECONDS)
    if grace is not None and grace < needed:
        cut_after = grace - proxy.shutdown.drain_delay_seconds - SHUTDOWN_MARGIN_SECONDS
        warnings.append(
            f"spec.proxy.terminationGracePeriodSeconds {grace} < drainDelaySeconds + "
            f"upstream.maxRequestSeconds + {SHUTDOWN_MARGIN_SECONDS} = {needed}: a stopping pod "
            f"cuts requests still running {cut_after} s after its drain delay; unset it to "
            "derive it")

    per_pod = pgb.max_db_connections or (pgb.default_pool_size + pgb.reserve_pool_size)
    server_conns = pgb.replicas * per_pod
    pg_usable = GUIDE_PG_MAX_CONNECTIONS - PG_SUPERUSER_RESERVED
    if server_conns > pg_usable:
        warnings.append(
            f"spec.pgbouncer.replicas {pgb.replicas} x maxDbConnections {per_pod} = "
            f"{server_conns} server connections exceed PostgreSQL max_connections "
            f"{GUIDE_PG_MAX_CONNECTIONS} (guide) minus {PG_SUPERUSER_RESERVED} reserved: set "
            f"maxDbConnections to {pg_usable // pgb.replicas} or raise max_connections")
    client_capacity = pgb.replicas * pgb.max_client_conn
    db_clients = replicas * proxy.workers * PROXY_DB_POOL_PER_WORKER
    if db_clients > client_capacity:
        warnings.append(
            f"{replicas} proxy replicas x {proxy.workers} workers x {PROXY_DB_POOL_PER_WORKER} "
            f"pooled connections = {db_clients} exceed PgBouncer's {client_capacity} client "
            "slots (spec.pgbouncer.replicas x maxClientConn)")

    redis_need = connections * REDIS_KEYS_PER_CLIENT * REDIS_BYTES_PER_KEY
    redis_max = redis_bytes(spec.redis.maxmemory)
    if spec.redis.mode == "bundled" and redis_need > redis_max:
        warnings.append(
            f"rate-limit keys may need ~{redis_need / 1024**3:.1f} GiB, above "
            f"spec.redis.maxmemory {spec.redis.maxmemory}: LRU eviction would reset limits")

    # Asked for, they come from the platform's node tuning (the chart's DaemonSet sets all of
    # them by default); not asked for, whoever tunes the nodes needs the list.
    missing = {} if spec.node_tuning.enabled else dict(NODE_TUNING_SYSCTLS)
    sizes = [_size("proxy", replicas, proxy_res, proxy.resources),
             _size("pgbouncer", pgb.replicas, pgbouncer_resources(pgb), pgb.resources)]
    if spec.redis.mode == "bundled":
        sizes.append(_size("redis", 1, redis_resources(spec.redis), spec.redis.resources))
    return Plan(connections, replicas, unbounded, cpr, target, per_replica, proxy.workers,
                fds_replica, fds_worker, memory, limit, server_conns,
                GUIDE_PG_MAX_CONNECTIONS, client_capacity, db_clients, redis_need, redis_max,
                missing, spec.node_tuning.enabled, warnings, sizes)
