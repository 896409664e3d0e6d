"""Container resources derived when a spec leaves them unset: the proxy per worker, PgBouncer
per client, the bundled Redis from maxmemory; defaults that a 4-vCPU / 16 GiB node fits."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from tests.operator.clusters import CREDENTIALS, by_key, cluster, minimal_body

from gpuproxy_operator.builders import BuildInputs, build_all
from gpuproxy_operator.sizing import (
    KERNEL_KIB_PER_SOCKET,
    PROXY_PROCESS_MIB,
    TLS_KIB_PER_CONNECTION,
    USER_KIB_PER_CONNECTION,
    cpu_quantity,
    memory_quantity,
    proxy_memory_bytes,
    quantity_bytes,
)

MIB = 1024**2
# What a 4-vCPU / 16 GiB node leaves for pods once the kubelet, the system and a few
# DaemonSets have their share (allocatable is ~3.9 CPU / ~14.5 GiB on common providers).
NODE_CPU_MILLI, NODE_MEMORY = 3500, 13 * 1024**3


def _resources(body: dict[str, Any], kind: str, name: str) -> dict[str, dict[str, str]]:
    m = by_key(build_all(cluster(body), BuildInputs(CREDENTIALS)))[(kind, name)]
    [container] = m["spec"]["template"]["spec"]["containers"]
    resources: dict[str, dict[str, str]] = container["resources"]
    return resources


def _milli(cpu: str) -> int:
    return int(cpu[:-1]) if cpu.endswith("m") else int(cpu) * 1000


def _mib(memory: str) -> float:
    value = quantity_bytes(memory)
    assert value is not None
    return value / MIB


def test_default_proxy_requests_750m_and_limits_one_core_per_worker() -> None:
    res = _resources(minimal_body(), "Deployment", "mini-proxy")
    assert (res["requests"]["cpu"], res["limits"]["cpu"]) == ("3", "4")  # 4 workers
    # 5 processes (4 workers + supervisor) x 72 MiB + 100k x (2.55 + 2 x 4) KiB, + 20%.
    estimate = 5 * PROXY_PROCESS_MIB + 100_000 * (USER_KIB_PER_CONNECTION
                                                 + 2 * KERNEL_KIB_PER_SOCKET) / 1024
    assert estimate == pytest.approx(1390.3, abs=0.1)
    assert _mib(res["requests"]["memory"]) == math.ceil(estimate * 1.2)
    assert _mib(res["limits"]["memory"]) == pytest.approx(1.5 * _mib(res["requests"]["memory"]),
                                                          abs=1)


@pytest.mark.parametrize(("workers", "cpu"), [(1, ("750m", "1")), (2, ("1500m", "2")),
                                              (16, ("12", "16"))])
def test_proxy_cpu_scales_with_workers(workers: int, cpu: tuple[str, str]) -> None:
    body = minimal_body()
    body["spec"]["proxy"]["workers"] = workers
    res = _resources(body, "Deployment", "mini-proxy")
    assert (res["requests"]["cpu"], res["limits"]["cpu"]) == cpu
    # One process without a supervisor; N workers + 1 otherwise.
    processes = workers + 1 if workers > 1 else 1
    assert proxy_memory_bytes(workers, 0) == processes * PROXY_PROCESS_MIB * MIB


def test_proxy_memory_follows_connections_per_replica() -> None:
    small, big = minimal_body(), minimal_body()
    small["spec"]["proxy"]["connectionsPerReplica"] = 10_000
    big["spec"]["proxy"]["connectionsPerReplica"] = 200_000
    requests = [_mib(_resources(b, "Deployment", "mini-proxy")["requests"]["memory"])
                for b in (small, big)]
    per_connection_kib = USER_KIB_PER_CONNECTION + 2 * KERNEL_KIB_PER_SOCKET
    assert requests[1] - requests[0] == pytest.approx(190_000 * per_connection_kib / 1024 * 1.2,
                                                      abs=2)


def test_tls_adds_its_measured_memory_per_connection() -> None:
    plain, tls = minimal_body(), minimal_body()
    tls["spec"]["proxy"]["tls"] = {"secretName": "mini-tls"}
    requests = [_mib(_resources(b, "Deployment", "mini-proxy")["requests"]["memory"])
                for b in (plain, tls)]
    # 100k connections x 23.1 KiB of TLS state, + 20%: about 2.6 GiB more per pod.
    assert requests[1] - requests[0] == pytest.approx(100_000 * TLS_KIB_PER_CONNECTION / 1024
                                                      * 1.2, abs=2)
    bench = (Path(__file__).resolve().parents[2] / "bench" / "README.md").read_text()
    assert f"**{TLS_KIB_PER_CONNECTION:g} KiB more per idle TLS connection**" in bench


def test_pgbouncer_uses_one_core_and_memory_for_max_client_conn() -> None:
    res = _resources(minimal_body(), "Deployment", "mini-pgbouncer")
    assert (res["requests"]["cpu"], res["limits"]["cpu"]) == ("500m", "1")
    # 16 MiB + 100k clients x (1 KiB + 4 KiB kernel) + 240 servers x (7 + 4) KiB.
    assert res["requests"]["memory"] == f"{math.ceil(16 + (100_000 * 5 + 240 * 11) / 1024)}Mi"
    # Every client with a query in flight holds a packet buffer.
    assert res["limits"]["memory"] == f"{math.ceil(16 + (100_000 + 240) * 11 / 1024)}Mi"
    body = minimal_body()
    body["spec"]["pgbouncer"] = {"maxClientConn": 10_000}
    smaller = _resources(body, "Deployment", "mini-pgbouncer")
    assert _mib(smaller["requests"]["memory"]) < _mib(res["requests"]["memory"]) / 5


@pytest.mark.parametrize(("redis", "requests", "limits"), [
    # 1 GiB x 1.25 fragmentation + 64 MiB; limit 1.5x; CPU limit: main + I/O threads.
    ({}, {"cpu": "500m", "memory": "1344Mi"}, {"cpu": "4", "memory": "2016Mi"}),
    # A BGSAVE fork may copy every page: 2 x maxmemory + 64 MiB.
    ({"persistence": True, "ioThreads": 1}, {"cpu": "500m", "memory": "1344Mi"},
     {"cpu": "1", "memory": "2112Mi"}),
    ({"maxmemory": "256mb"}, {"cpu": "500m", "memory": "384Mi"},
     {"cpu": "4", "memory": "576Mi"}),
])
def test_bundled_redis_is_sized_from_maxmemory(redis: dict[str, Any], requests: dict[str, str],
                                               limits: dict[str, str]) -> None:
    body = minimal_body()
    body["spec"]["redis"] = redis
    assert _resources(body, "StatefulSet", "mini-redis") == {"requests": requests,
                                                            "limits": limits}


@pytest.mark.parametrize(("kind", "name"), [("Deployment", "mini-proxy"),
                                            ("Deployment", "mini-pgbouncer"),
                                            ("StatefulSet", "mini-redis")])
def test_each_default_fits_a_4_vcpu_16_gib_node(kind: str, name: str) -> None:
    res = _resources(minimal_body(), kind, name)
    assert _milli(res["requests"]["cpu"]) <= NODE_CPU_MILLI
    assert _mib(res["requests"]["memory"]) * MIB <= NODE_MEMORY
    # Limits too: a pod must not be allowed to outgrow its node.
    assert _mib(res["limits"]["memory"]) * MIB <= NODE_MEMORY
    assert _milli(res["limits"]["cpu"]) <= 4000


@pytest.mark.parametrize("component", ["proxy", "pgbouncer", "redis"])
def test_spec_resources_are_taken_as_written_and_empty_means_derived(component: str) -> None:
    kind, name = {"proxy": ("Deployment", "mini-proxy"),
                  "pgbouncer": ("Deployment", "mini-pgbouncer"),
                  "redis": ("StatefulSet", "mini-redis")}[component]
    given = {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}}
    body = minimal_body()
    body["spec"].setdefault(component, {})["resources"] = given
    assert _resources(body, kind, name) == given
    empty = minimal_body()
    empty["spec"].setdefault(component, {})["resources"] = {}
    assert _resources(empty, kind, name) == _resources(minimal_body(), kind, name)


@pytest.mark.parametrize(("milli", "text"), [(750, "750m"), (3000, "3"), (1500, "1500m"),
                                             (12000, "12")])
def test_cpu_quantities_are_canonical(milli: int, text: str) -> None:
    assert cpu_quantity(milli) == text


@pytest.mark.parametrize(("n_bytes", "text"), [(2048 * MIB, "2Gi"), (2063.3 * MIB, "2064Mi"),
                                               (1 * MIB + 1, "2Mi"), (1024 * MIB, "1Gi")])
def test_memory_quantities_round_up_to_canonical_mib(n_bytes: float, text: str) -> None:
    assert memory_quantity(n_bytes) == text
