"""The pure capacity plan for a connection target: proxy replicas, file descriptors and memory
per replica, PgBouncer server connections, Redis memory, node sysctls, and warnings."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from gpuproxy_operator.api.cluster import GpuProxyClusterSpec
from gpuproxy_operator.api.components import GUIDE_SYSCTLS
from gpuproxy_operator.autoscaling.policy import per_replica_target, replica_bounds

# PostgreSQL max_connections in the deployment guide (PgBouncer fans in to at most this).
GUIDE_PG_MAX_CONNECTIONS = 500
PG_SUPERUSER_RESERVED = 3  # PostgreSQL's default superuser_reserved_connections
# Open files per process in the guide (limits.conf / LimitNOFILE); container runtimes usually
# give 1048576.
GUIDE_NOFILE = 1_000_000
# User-space memory of one idle keep-alive client connection in a proxy worker. MEASURED:
# RSS growth per connection with 38,000 idle connections over 2 workers, bench/README.md
# ("After the pooled protocol-level upstream client"), from
# `.venv/bin/python bench/idle_connections.py --targets proxy --per-worker 19000 --sources 4`.
# Re-measure with that command when the client side changes, and update this one figure.
USER_KIB_PER_CONNECTION = 6.33
# Kernel memory of one mostly idle TCP socket (struct sock, small skbs): ASSUMED, ~4 KiB; busy
# sockets can use up to tcp_rmem/tcp_wmem maxima. cgroup v2 charges it to the pod.
KERNEL_KIB_PER_SOCKET = 4.0
MEMORY_SOURCE = (f"{USER_KIB_PER_CONNECTION:g} KiB user space per idle connection, measured "
                 f"(bench/idle_connections.py), plus {KERNEL_KIB_PER_SOCKET:g} KiB kernel per "
                 "socket, assumed")
# Per-process file descriptors besides sockets (listeners, pools, logs, Python itself).
FD_BASE = 1024
# Redis: a rate-limit counter key (string, TTL) costs ~120 bytes; each active principal uses up
# to 3 scopes (IP, user, API key) x 2 windows (sliding-window counter). ASSUMED, worst case
# where every connection is a distinct IP, user and key.
REDIS_BYTES_PER_KEY = 120
REDIS_KEYS_PER_CLIENT = 6
# The proxy's database.pool_max_size default per worker (the operator does not override it).
PROXY_DB_POOL_PER_WORKER = 10
# Kernel settings the guide's file lacks but 1M connections through a Service need.
EXTRA_SYSCTLS: dict[str, str] = {
    "fs.nr_open": "1048576",
    "fs.file-max": "4194304",
    "net.netfilter.nf_conntrack_max": "2097152",
}

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1024, "m": 1000**2, "mb": 1024**2,
          "g": 1000**3, "gb": 1024**3}
_QUANTITY_UNITS = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4,
                   "k": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4, "": 1}


def redis_bytes(value: str) -> int:
    """redis.conf memory units (16gb = 16 GiB, 16g = 16e9)."""
    match = re.fullmatch(r"([0-9]+)([a-z]*)", value.lower())
    if not match or match.group(2) not in _UNITS:
        raise ValueError(f"not a redis memory size: {value!r}")
    return int(match.group(1)) * _UNITS[match.group(2)]


def quantity_bytes(value: str) -> int | None:
    """A Kubernetes memory quantity in bytes, or None when it is not a plain one."""
    match = re.fullmatch(r"([0-9.]+)([KMGT]i?|k)?", value)
    if not match:
        return None
    return int(float(match.group(1)) * _QUANTITY_UNITS[match.group(2) or ""])


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
    memory = int(cpr * (USER_KIB_PER_CONNECTION + 2 * KERNEL_KIB_PER_SOCKET) * 1024)
    limit = quantity_bytes(proxy.resources.limits.get("memory", ""))
    if limit is not None and limit < memory:
        warnings.append(
            f"spec.proxy.resources.limits.memory {proxy.resources.limits['memory']} is below "
            f"the ~{memory / 1024**3:.1f} GiB {cpr} connections need ({MEMORY_SOURCE})")

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

    wanted = {**GUIDE_SYSCTLS, **EXTRA_SYSCTLS}
    have = spec.node_tuning.sysctls if spec.node_tuning.enabled else {}
    missing = {k: v for k, v in wanted.items() if k not in have}
    return Plan(connections, replicas, unbounded, cpr, target, per_replica, proxy.workers,
                fds_replica, fds_worker, memory, limit, server_conns,
                GUIDE_PG_MAX_CONNECTIONS, client_capacity, db_clients, redis_need, redis_max,
                missing, spec.node_tuning.enabled, warnings)
