"""The operator's own Prometheus metrics, on a registry of their own, served on a port."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

NAMESPACE = "gpuproxy_operator"


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

    def api_call(self, verb: str, kind: str, code: str) -> None:
        self.api_calls.labels(verb, kind, code).inc()


def serve(metrics: OperatorMetrics, port: int, addr: str = "0.0.0.0"
          ) -> tuple[WSGIServer, threading.Thread]:
    """Serve /metrics on a background thread; stop with `server.shutdown()`."""
    server, thread = start_http_server(port, addr=addr, registry=metrics.registry)
    return server, thread
