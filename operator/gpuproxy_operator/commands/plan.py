"""`gpuproxy-operator plan --connections N [-f cluster.yaml]`: the capacity plan for N concurrent
connections (replicas, file descriptors, memory, PgBouncer, Redis, sysctls) and its warnings."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from gpuproxy_operator.api.base import KIND
from gpuproxy_operator.api.cluster import GpuProxyClusterSpec, parse_cluster
from gpuproxy_operator.autoscaling.capacity import MEMORY_SOURCE, ComponentSize, Plan, plan
from gpuproxy_operator.commands.arguments import positive_int
from gpuproxy_operator.commands.inputs import INPUT_ERRORS, read_documents, report_input_error
from gpuproxy_operator.sizing import (
    PROXY_PROCESS_MIB,
    REDIS_BYTES_PER_KEY,
    REDIS_KEYS_PER_CLIENT,
    quantity_bytes,
)

# Without -f: the API defaults, with autoscaling on (placeholder backend and database).
DEFAULT_SPEC: dict[str, Any] = {
    "proxy": {"backends": [{"name": "gpu", "url": "http://gpu:8000"}]},
    "database": {"host": "postgres", "credentialsSecret": "db"},
    "autoscaling": {"enabled": True},
}


def _gib(n: float) -> str:
    return f"{n / 1024**3:.1f} GiB"


def _cpu_milli(value: str) -> int:
    return int(value[:-1]) if value.endswith("m") else int(float(value) * 1000)


def _resource_lines(sizes: list[ComponentSize]) -> list[str]:
    """Per pod and in total, so the figures can be checked against the nodes' allocatable."""
    lines = []
    for s in sizes:
        req, lim = s.requests, s.limits
        per_pod = (f"requests {req.get('cpu', '-')} CPU / {req.get('memory', '-')}, limits "
                   f"{lim.get('cpu', '-')} CPU / {lim.get('memory', '-')}")
        total = ""
        if "cpu" in req and "memory" in req and (mem := quantity_bytes(req["memory"])):
            total = (f"; x {s.pods} = {_cpu_milli(req['cpu']) * s.pods / 1000:g} CPU / "
                     f"{_gib(mem * s.pods)} requested")
        origin = "derived" if s.derived else "spec"
        lines.append(f"  {s.name:<24} {per_pod} per pod ({origin}){total}")
    return lines


def render(p: Plan, source: str) -> str:
    lines = [
        f"Capacity plan for {p.connections:,} concurrent connections ({source})",
        "",
        "Proxy",
        f"  replicas                 {p.replicas}  ({p.connections_at_plan:,.0f} connections "
        f"each; {p.replicas_unbounded} keep the {p.target_per_replica:,.0f}/replica target)",
        f"  connectionsPerReplica    {p.connections_per_replica:,}",
        f"  file descriptors         {p.fds_per_replica:,} per replica, {p.fds_per_worker:,} "
        f"per worker process ({p.workers} workers): 2 per connection (client + upstream) + "
        "upstream pool + 1024",
        f"  memory                   ~{_gib(p.memory_per_replica_bytes)} per replica: "
        f"{p.workers} idle worker processes (+ supervisor) x {PROXY_PROCESS_MIB} MiB + "
        f"{p.connections_per_replica:,} connections (note 1)"
        + (f"; limit {_gib(p.memory_limit_bytes)}" if p.memory_limit_bytes else ""),
        "",
        "PgBouncer / PostgreSQL",
        f"  server connections       {p.pgbouncer_server_connections} (pgbouncer.replicas x "
        f"maxDbConnections) vs PostgreSQL max_connections {p.pg_max_connections} (guide)",
        f"  client connections       {p.proxy_db_clients:,} from the proxies' pools vs "
        f"{p.pgbouncer_client_capacity:,} slots (replicas x maxClientConn)",
        "",
        "Redis",
        f"  rate-limit memory        ~{_gib(p.redis_bytes)} worst case ({REDIS_KEYS_PER_CLIENT} "
        f"counter keys x ~{REDIS_BYTES_PER_KEY} B per distinct client) vs maxmemory "
        f"{_gib(p.redis_maxmemory_bytes)}",
        "",
        "Resources (spec, or derived when spec resources are unset)",
        *_resource_lines(p.resources),
        "",
        "Node sysctls needed" + (
            ": from the platform's node tuning (the operator chart's nodeTuning.enabled; "
            "NodeTuningReady says whether the nodes are tuned)" if p.node_tuning
            else " (spec.nodeTuning.enabled is false: set them on the nodes yourself)"),
    ]
    lines += [f"  {k} = {v}" for k, v in sorted(p.sysctls_missing.items())]
    lines.append("")
    if p.warnings:
        lines.append(f"Warnings ({len(p.warnings)})")
        lines += [f"  ! {w}" for w in p.warnings]
    else:
        lines.append("No warnings: the spec reaches the target.")
    lines += ["", f"Note 1: memory per connection: {MEMORY_SOURCE}."]
    return "\n".join(lines)


def load_spec(filename: str) -> tuple[GpuProxyClusterSpec, str]:
    """The first GpuProxyCluster in FILE ('-' for stdin)."""
    for doc in read_documents(filename):
        if isinstance(doc, dict) and doc.get("kind") == KIND:
            doc.setdefault("metadata", {}).setdefault("namespace", "default")
            cluster = parse_cluster(doc)
            return cluster.spec, f"{KIND} {cluster.metadata.namespace}/{cluster.metadata.name}"
    raise ValueError(f"no {KIND} found in {filename}")


def default_connections(spec: GpuProxyClusterSpec) -> int:
    """What the spec is sized for: the autoscaling target, or, with autoscaling off (where the
    operator ignores targetConnections), what the fixed replicas hold."""
    if spec.autoscaling.enabled:
        return spec.autoscaling.target_connections
    fixed = spec.proxy.replicas * spec.proxy.connections_per_replica
    return fixed or spec.autoscaling.target_connections


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--connections", type=positive_int, default=None,
                        help="concurrent client connections to plan for (default: "
                        "spec.autoscaling.targetConnections; with autoscaling off, "
                        "spec.proxy.replicas x connectionsPerReplica)")
    parser.add_argument("-f", "--filename",
                        help="YAML file with a GpuProxyCluster (default: the API defaults with "
                        "autoscaling on); - for stdin")
    parser.add_argument("-o", "--output", choices=["text", "json"], default="text")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when there are warnings (for CI)")


def main(args: argparse.Namespace) -> int:
    try:
        if args.filename:
            spec, source = load_spec(args.filename)
        else:
            spec, source = GpuProxyClusterSpec.model_validate(DEFAULT_SPEC), "API defaults"
    except INPUT_ERRORS as exc:
        return report_input_error(args.filename, exc)
    connections = default_connections(spec) if args.connections is None else args.connections
    result = plan(spec, connections)
    if args.output == "json":
        print(json.dumps(asdict(result), indent=2))
    else:
        print(render(result, source))
    return 1 if args.strict and result.warnings else 0
