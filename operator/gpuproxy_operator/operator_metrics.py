"""The operator's own Prometheus metrics, on a registry of their own, served on a port."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

NAMESPACE = "gpuproxy_operator"
CLUSTER_LABELS = ["cluster_namespace", "cluster"]


@dataclass
class OperatorMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.reconciles = Counter(
            "reconciles", "Reconciles of GpuProxyClusters by trigger and result",
            ["trigger", "result"], namespace=NAMESPACE, registry=r)
        self.errors = Counter(
            "reconcile_errors", "Failed reconciles by error type", ["error"],
            namespace=NAMESPACE, registry=r)
        self.duration = Histogram(
            "reconcile_duration_seconds", "Time one reconcile takes, API calls included",
            namespace=NAMESPACE, registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.api_calls = Counter(
            "api_calls", "Kubernetes API calls by verb, kind and HTTP code ('error': no answer)",
            ["verb", "kind", "code"], namespace=NAMESPACE, registry=r)
        self.child_writes = Counter(
            "child_writes", "Writes to child objects by kind and reason",
            ["kind", "reason"], namespace=NAMESPACE, registry=r)
        self.managed_clusters = Gauge(
            "managed_clusters", "GpuProxyClusters this operator manages", namespace=NAMESPACE,
            registry=r)
        # Per cluster, labelled cluster_namespace rather than namespace: a scrape sets
        # `namespace` to the operator's own, and would rename ours to exported_namespace.
        self.autoscaler_able = Gauge(
            "autoscaler_able", "1 while the autoscaler can scale the cluster (its Scaling "
            "condition is True), 0 while it cannot", CLUSTER_LABELS, namespace=NAMESPACE,
            registry=r)
        self.autoscaler_steps = Counter(
            "autoscaler_steps", "Autoscaler steps by the Scaling condition's reason",
            [*CLUSTER_LABELS, "reason"], namespace=NAMESPACE, registry=r)
        self.autoscaler_scalings = Counter(
            "autoscaler_scalings", "Replica changes the autoscaler made, by direction",
            [*CLUSTER_LABELS, "direction"], namespace=NAMESPACE, registry=r)
        self.autoscaler_desired_replicas = Gauge(
            "autoscaler_desired_replicas", "Proxy replicas the autoscaler last asked for",
            CLUSTER_LABELS, namespace=NAMESPACE, registry=r)

    def api_call(self, verb: str, kind: str, code: str) -> None:
        self.api_calls.labels(verb, kind, code).inc()

    def autoscaler_step(self, namespace: str, cluster: str, able: bool, reason: str,
                        desired_replicas: int | None = None, scaled_by: int = 0) -> None:
        """Record one autoscaler step: what its Scaling condition says, and any scale."""
        self.autoscaler_able.labels(namespace, cluster).set(1 if able else 0)
        self.autoscaler_steps.labels(namespace, cluster, reason).inc()
        if desired_replicas is not None:
            self.autoscaler_desired_replicas.labels(namespace, cluster).set(desired_replicas)
        if scaled_by:
            direction = "up" if scaled_by > 0 else "down"
            self.autoscaler_scalings.labels(namespace, cluster, direction).inc()

    def autoscaler_stopped(self, namespace: str, cluster: str) -> None:
        """The loop ended (disabled, paused, deleted): its gauges go, so no alert waits on a
        cluster nobody autoscales; the counters stay, as counters do."""
        for gauge in (self.autoscaler_able, self.autoscaler_desired_replicas):
            with contextlib.suppress(KeyError):
                gauge.remove(namespace, cluster)


def serve(metrics: OperatorMetrics, port: int, addr: str = "0.0.0.0"
          ) -> tuple[WSGIServer, threading.Thread]:
    """Serve /metrics on a background thread; stop with `server.shutdown()`."""
    server, thread = start_http_server(port, addr=addr, registry=metrics.registry)
    return server, thread
