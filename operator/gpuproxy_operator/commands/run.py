"""`gpuproxy-operator run`: start the operator (kopf) against the current cluster, cluster-wide
or in some namespaces, with a liveness endpoint, its own Prometheus metrics, a client-side
API rate limit and (by default) Lease-based leader election between replicas."""

from __future__ import annotations

import argparse
import logging
import math
import os
import socket
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from gpuproxy_operator.commands.arguments import port_or_zero, positive_float, positive_int

if TYPE_CHECKING:
    from gpuproxy_operator.leader import LeaseConfig

SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def _env(name: str, default: str) -> str:
    # A string default goes through the flag's type, so an environment value is checked too.
    return os.environ.get(name) or default


def _rate(text: str) -> float:
    """Requests per second; 0 turns the client-side limit off."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be 0 (no limit) or more, got {text}")
    return value


def _yes(text: str) -> bool:
    return text.strip().lower() not in ("0", "false", "no", "off")


def _pod_namespace() -> str | None:
    """The operator pod's namespace (downward API, or the service account's mount); None
    outside a cluster."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        return SA_NAMESPACE.read_text().strip() or None
    except OSError:
        return None


def _own_namespace() -> str:
    """Where the Lease lives: the pod's namespace, else `default` (a local run)."""
    return _pod_namespace() or "default"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n", "--namespace", action="append", default=None, metavar="NS",
        help="watch only this namespace (repeatable; env GPUPROXY_WATCH_NAMESPACE, "
        "comma-separated)")
    scope.add_argument("-A", "--all-namespaces", action="store_true",
                       help="watch every namespace (the default)")
    parser.add_argument(
        "--metrics-port", type=port_or_zero, default=_env("GPUPROXY_METRICS_PORT", "8080"),
        help="port of the operator's /metrics; 0 turns it off (env GPUPROXY_METRICS_PORT)")
    parser.add_argument(
        "--metrics-addr", default=os.environ.get("GPUPROXY_METRICS_ADDR", "0.0.0.0"),
        help="address /metrics listens on (env GPUPROXY_METRICS_ADDR)")
    parser.add_argument(
        "--liveness", default=os.environ.get("GPUPROXY_LIVENESS", "http://0.0.0.0:8081/healthz"),
        help="kopf liveness endpoint URL; empty turns it off (env GPUPROXY_LIVENESS)")
    parser.add_argument(
        "--resync-seconds", type=positive_float, default=_env("GPUPROXY_RESYNC_SECONDS", "600"),
        help="re-reconcile every cluster this often, from the watch caches (env "
        "GPUPROXY_RESYNC_SECONDS)")
    parser.add_argument(
        "--kube-api-qps", type=_rate, default=_env("GPUPROXY_KUBE_API_QPS", "20"),
        help="client-side limit of the operator's API requests per second, 0 for none (env "
        "GPUPROXY_KUBE_API_QPS)")
    parser.add_argument(
        "--kube-api-burst", type=positive_int, default=_env("GPUPROXY_KUBE_API_BURST", "30"),
        help="requests allowed at once above the QPS (env GPUPROXY_KUBE_API_BURST)")
    parser.add_argument(
        "--max-concurrent-reconciles", type=positive_int,
        default=_env("GPUPROXY_MAX_CONCURRENT_RECONCILES", "4"),
        help="clusters reconciled at once, e.g. after a restart (env "
        "GPUPROXY_MAX_CONCURRENT_RECONCILES)")
    election = parser.add_argument_group("leader election (a coordination.k8s.io/v1 Lease)")
    election.add_argument(
        "--leader-elect", action=argparse.BooleanOptionalAction,
        default=_yes(os.environ.get("GPUPROXY_LEADER_ELECT", "true")),
        help="run only while holding the Lease, so replicas never both write (env "
        "GPUPROXY_LEADER_ELECT; default on)")
    election.add_argument(
        "--leader-election-namespace", default=os.environ.get("GPUPROXY_LEADER_ELECTION_NAMESPACE")
        or None, help="namespace of the Lease (default: the pod's, from POD_NAMESPACE or the "
        "service account, else default)")
    election.add_argument(
        "--leader-election-id", default=os.environ.get("GPUPROXY_LEADER_ELECTION_ID")
        or "gpuproxy-operator", help="name of the Lease (env GPUPROXY_LEADER_ELECTION_ID)")
    election.add_argument(
        "--identity", default=os.environ.get("POD_NAME") or None,
        help="holder identity (default: POD_NAME, else the host name and a random suffix)")
    election.add_argument("--lease-duration", type=positive_float, default=15.0,
                          help="seconds a follower waits before taking an unrenewed lease")
    election.add_argument("--renew-deadline", type=positive_float, default=10.0,
                          help="seconds the leader keeps trying to renew before it stops")
    election.add_argument("--retry-period", type=positive_float, default=2.0,
                          help="seconds between lease renewals and acquisition attempts")
    parser.add_argument(
        "--watch-inactivity-timeout", type=positive_float,
        default=_env("GPUPROXY_WATCH_INACTIVITY_TIMEOUT", "300"),
        help="restart a watch that has been silent this long (env "
        "GPUPROXY_WATCH_INACTIVITY_TIMEOUT)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def namespaces_from(args: argparse.Namespace) -> tuple[str, ...]:
    """--namespace wins, then GPUPROXY_WATCH_NAMESPACE; --all-namespaces or nothing: all."""
    if args.all_namespaces:
        return ()
    if args.namespace:
        return tuple(args.namespace)
    env = os.environ.get("GPUPROXY_WATCH_NAMESPACE", "")
    return tuple(ns.strip() for ns in env.split(",") if ns.strip())


def lease_config(args: argparse.Namespace) -> LeaseConfig | None:
    from gpuproxy_operator.leader import LeaseConfig

    if not args.leader_elect:
        return None
    identity = args.identity or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    return LeaseConfig(namespace=args.leader_election_namespace or _own_namespace(),
                       identity=identity, name=args.leader_election_id,
                       lease_duration=args.lease_duration, renew_deadline=args.renew_deadline,
                       retry_period=args.retry_period)


def main(args: argparse.Namespace) -> int:
    import asyncio

    from gpuproxy_operator import handlers, kube, operator_metrics, platform
    from gpuproxy_operator.engine import OperatorState
    from gpuproxy_operator.ratelimit import TokenBucket

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    election = lease_config(args)
    problems = election.problems() if election is not None else []
    if problems:
        logging.getLogger("gpuproxy_operator").error("leader election: " + "; ".join(problems))
        return 2
    namespaces = namespaces_from(args)
    try:
        installed = platform.from_env(os.environ, _pod_namespace())
    except platform.PlatformConfigError as exc:
        logging.getLogger("gpuproxy_operator").error(str(exc))
        return 2
    metrics = operator_metrics.OperatorMetrics()
    agent = "gpuproxy-operator" + (f" ({election.identity})" if election is not None else "")
    state = OperatorState(
        kube=kube.KubeClient(on_call=metrics.api_call, user_agent=agent,
                             limiter=TokenBucket(args.kube_api_qps, args.kube_api_burst)),
        metrics=metrics,
        namespaces=namespaces,
        resync_seconds=args.resync_seconds,
        inactivity_timeout=args.watch_inactivity_timeout,
        concurrency=args.max_concurrent_reconciles,
        platform=installed,
    )
    if handlers.load_autoscaling():
        logging.getLogger("gpuproxy_operator").info("autoscaling handlers loaded")
    server = None
    if args.metrics_port:
        server, _ = operator_metrics.serve(metrics, args.metrics_port, args.metrics_addr)
    lost = None
    try:
        lost = asyncio.run(handlers.run_operator(
            state, clusterwide=not namespaces, liveness_endpoint=args.liveness or None,
            election=election))
    except KeyboardInterrupt:
        pass
    finally:
        if server is not None:
            server.shutdown()
    # Exit non-zero after a lost lease: the kubelet restarts the pod, which then waits as a
    # follower (controller-runtime does the same).
    return 1 if lost else 0


