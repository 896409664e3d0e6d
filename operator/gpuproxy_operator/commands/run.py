"""`gpuproxy-operator run`: start the operator (kopf) against the current cluster, cluster-wide
or in some namespaces, with a liveness endpoint and its own Prometheus metrics."""

from __future__ import annotations

import argparse
import logging
import os

from gpuproxy_operator.commands.arguments import port_or_zero, positive_float


def _env(name: str, default: str) -> str:
    # A string default goes through the flag's type, so an environment value is checked too.
    return os.environ.get(name) or default


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
        "--resync-seconds", type=positive_float, default=_env("GPUPROXY_RESYNC_SECONDS", "60"),
        help="re-reconcile every cluster this often (env GPUPROXY_RESYNC_SECONDS)")
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


def main(args: argparse.Namespace) -> int:
    import asyncio

    from gpuproxy_operator import handlers, kube, operator_metrics
    from gpuproxy_operator.engine import OperatorState

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    namespaces = namespaces_from(args)
    metrics = operator_metrics.OperatorMetrics()
    state = OperatorState(
        kube=kube.KubeClient(on_call=metrics.api_call),
        metrics=metrics,
        namespaces=namespaces,
        resync_seconds=args.resync_seconds,
        inactivity_timeout=args.watch_inactivity_timeout,
    )
    if handlers.load_autoscaling():
        logging.getLogger("gpuproxy_operator").info("autoscaling handlers loaded")
    server = None
    if args.metrics_port:
        server, _ = operator_metrics.serve(metrics, args.metrics_port, args.metrics_addr)
    try:
        asyncio.run(handlers.run_operator(
            state, clusterwide=not namespaces, liveness_endpoint=args.liveness or None))
    except KeyboardInterrupt:
        pass
    finally:
        if server is not None:
            server.shutdown()
    return 0


