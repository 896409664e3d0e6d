"""The measured memory and CPU figures, and the container resources derived from them for the
proxy, PgBouncer and the bundled Redis when a spec leaves `resources` unset (pure)."""

from __future__ import annotations

import math
import re
from fractions import Fraction

from gpuproxy_operator.api.base import Resources
from gpuproxy_operator.api.components import PgBouncerSpec, RedisSpec
from gpuproxy_operator.api.proxy import ProxySpec

KIB, MIB = 1024, 1024**2

# User-space memory of one idle keep-alive client connection in a proxy worker. MEASURED:
# RSS growth per connection with 38,000 idle connections over 2 workers (and the same with
# 100,000 over 6), on the lean client-side server, bench/README.md ("New column"), from
# `.venv/bin/python bench/idle_connections.py --targets proxy --per-worker 19000 --sources 4`.
# Re-measure with that command when the client side changes, and update this one figure.
USER_KIB_PER_CONNECTION = 2.55
# What TLS adds to an idle client connection (OpenSSL's per-connection state, uvloop's
# SSLProtocol and its memory BIOs). MEASURED: 25.5 KiB with TLS against 2.45 plain per idle
# connection, one worker, 5,000 connections, bench/README.md ("TLS termination"), from
# `.venv/bin/python bench/tls_cost.py --measure memory`; nginx adds 15 KiB for the same.
TLS_KIB_PER_CONNECTION = 23.1
# Kernel memory of one mostly idle TCP socket (struct sock, small skbs): ASSUMED, ~4 KiB; busy
# sockets can use up to tcp_rmem/tcp_wmem maxima. cgroup v2 charges it to the pod.
KERNEL_KIB_PER_SOCKET = 4.0
MEMORY_SOURCE = (f"{USER_KIB_PER_CONNECTION:g} KiB user space per idle connection, measured "
                 f"(bench/idle_connections.py), plus {KERNEL_KIB_PER_SOCKET:g} KiB kernel per "
                 "socket, assumed")
# RSS of one idle proxy process (a worker, or the supervisor when workers > 1) running the
# operator's rendered config against real Redis and PgBouncer. MEASURED: 62.5-63.0 MiB RSS (PSS
# 46 MiB, anonymous 43 MiB) with 1, 2 and 4 workers; tests/operator/test_rendered_proxy.py
# re-measures it (`-s` prints it). 72 leaves room for allocator variance. RSS counts shared
# libraries in every process, so the sum over processes errs high.
PROXY_PROCESS_MIB = 72
# Workers are single-threaded: one core is all each can use; 750m requested packs a 4-worker
# pod onto a 4-vCPU node next to the system daemons.
PROXY_CPU_MILLI_REQUEST_PER_WORKER = 750
PROXY_CPU_MILLI_LIMIT_PER_WORKER = 1000
# Over the estimate of idle connections: request buffers of busy ones, GC headroom.
MEMORY_MARGIN = Fraction(6, 5)
LIMIT_OVER_REQUEST = Fraction(3, 2)

# PgBouncer 1.18 with the rendered pgbouncer.ini (tests/operator/test_sizing_measured.py): RSS
# 8.6 MiB with no clients, 0.67-0.69 KiB per logged-in idle client (1,500 and 6,000 clients),
# 6.9 KiB per client that has run a query (its packet buffer, kept afterwards). MEASURED;
# rounded up.
PGBOUNCER_BASE_MIB = 16
PGBOUNCER_IDLE_CLIENT_KIB = 1.0
PGBOUNCER_ACTIVE_CLIENT_KIB = 7.0
# Single-threaded: more than one core is never used.
PGBOUNCER_CPU_MILLI_REQUEST = 500
PGBOUNCER_CPU_MILLI_LIMIT = 1000

# Redis: one rate-limit counter key (rl:<scope>:<id>:<window>, an integer with a TTL) costs
# 122-137 bytes of used_memory (60,000 and 150,000 keys; the hash table grows in steps) and 150
# of RSS. MEASURED on redis-server 7.0 with the proxy's Lua script
# (tests/operator/test_sizing_measured.py). Each distinct client has up to 3 scopes (IP, user,
# API key) x 2 windows (sliding-window counter) alive.
REDIS_BYTES_PER_KEY = 150
REDIS_KEYS_PER_CLIENT = 6
# Process, client buffers of the few proxy connections, Lua: over maxmemory, which counts data.
REDIS_BASE_MIB = 64
REDIS_FRAGMENTATION = Fraction(5, 4)
REDIS_CPU_MILLI_REQUEST = 500

_REDIS_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1024, "m": 1000**2, "mb": 1024**2,
                "g": 1000**3, "gb": 1024**3}
_QUANTITY_UNITS = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4,
                   "k": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4, "": 1}


def redis_bytes(value: str) -> int:
    """redis.conf memory units (16gb = 16 GiB, 16g = 16e9)."""
    match = re.fullmatch(r"([0-9]+)([a-z]*)", value.lower())
    if not match or match.group(2) not in _REDIS_UNITS:
        raise ValueError(f"not a redis memory size: {value!r}")
    return int(match.group(1)) * _REDIS_UNITS[match.group(2)]


def quantity_bytes(value: str) -> int | None:
    """A Kubernetes memory quantity in bytes, or None when it is not a plain one."""
    match = re.fullmatch(r"([0-9.]+)([KMGT]i?|k)?", value)
    if not match:
        return None
    return int(float(match.group(1)) * _QUANTITY_UNITS[match.group(2) or ""])


def cpu_quantity(milli: int) -> str:
    """The API server's canonical form, so a read-back never looks like drift: 3 or 750m."""
    return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"


def memory_quantity(n_bytes: float) -> str:
    """Rounded up to MiB, in canonical form (2Gi, not 2048Mi)."""
    mib = math.ceil(n_bytes / MIB)
    return f"{mib // 1024}Gi" if mib % 1024 == 0 else f"{mib}Mi"


def _resources(cpu: tuple[int, int], memory: tuple[float, float]) -> Resources:
    return Resources(requests={"cpu": cpu_quantity(cpu[0]), "memory": memory_quantity(memory[0])},
                     limits={"cpu": cpu_quantity(cpu[1]), "memory": memory_quantity(memory[1])})


def _given(resources: Resources | None) -> Resources | None:
    """The spec's own resources, taken as written; unset or empty means derived."""
    if resources is None or not (resources.requests or resources.limits):
        return None
    return resources


def proxy_processes(workers: int) -> int:
    """Processes in a proxy pod: with several workers a supervisor serves the admin port."""
    return workers + 1 if workers > 1 else 1


def proxy_memory_bytes(workers: int, connections: int, tls: bool = False) -> int:
    """Estimated memory of one proxy pod holding `connections` idle keep-alive connections,
    each with a client and an upstream socket (and TLS state on the client side with `tls`)."""
    user_kib = USER_KIB_PER_CONNECTION + (TLS_KIB_PER_CONNECTION if tls else 0.0)
    per_connection = (user_kib + 2 * KERNEL_KIB_PER_SOCKET) * KIB
    return int(proxy_processes(workers) * PROXY_PROCESS_MIB * MIB + connections * per_connection)


def proxy_resources(proxy: ProxySpec) -> Resources:
    given = _given(proxy.resources)
    if given is not None:
        return given
    request = proxy_memory_bytes(proxy.workers, proxy.connections_per_replica,
                                 tls=proxy.tls is not None) * MEMORY_MARGIN
    return _resources(
        (proxy.workers * PROXY_CPU_MILLI_REQUEST_PER_WORKER,
         proxy.workers * PROXY_CPU_MILLI_LIMIT_PER_WORKER),
        (float(request), float(request * LIMIT_OVER_REQUEST)),
    )


def pgbouncer_resources(pgb: PgBouncerSpec) -> Resources:
    """Memory for maxClientConn logged-in clients (request) or all of them with a query in
    flight (limit), plus the server connections, each with a kernel socket."""
    given = _given(pgb.resources)
    if given is not None:
        return given
    servers = pgb.max_db_connections or (pgb.default_pool_size + pgb.reserve_pool_size)
    base = PGBOUNCER_BASE_MIB * MIB + servers * (PGBOUNCER_ACTIVE_CLIENT_KIB
                                                 + KERNEL_KIB_PER_SOCKET) * KIB
    idle = pgb.max_client_conn * (PGBOUNCER_IDLE_CLIENT_KIB + KERNEL_KIB_PER_SOCKET) * KIB
    busy = pgb.max_client_conn * (PGBOUNCER_ACTIVE_CLIENT_KIB + KERNEL_KIB_PER_SOCKET) * KIB
    return _resources((PGBOUNCER_CPU_MILLI_REQUEST, PGBOUNCER_CPU_MILLI_LIMIT),
                      (base + idle, base + busy))


def redis_resources(redis: RedisSpec) -> Resources:
    """maxmemory plus allocator fragmentation; the limit leaves 1.5x, or with persistence
    room for a BGSAVE fork's copy-on-write (up to a second copy of the data)."""
    given = _given(redis.resources)
    if given is not None:
        return given
    data = redis_bytes(redis.maxmemory)
    request = data * REDIS_FRAGMENTATION + REDIS_BASE_MIB * MIB
    limit = request * LIMIT_OVER_REQUEST
    if redis.persistence:
        limit = max(limit, Fraction(2 * data + REDIS_BASE_MIB * MIB))
    # The main thread plus ioThreads - 1 I/O threads can each keep a core busy.
    return _resources((REDIS_CPU_MILLI_REQUEST, 1000 * redis.io_threads),
                      (float(request), float(limit)))
