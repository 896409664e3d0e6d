"""The proxy's config file (`config.yaml`), rendered from the cluster spec as a dict that
`gpuproxy_proxy.config.ProxyConfig` accepts. Secrets never go here, only the paths of the
mounted Secret files (`secret_files`)."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

from gpuproxy_operator.api.cluster import GpuProxyCluster
from gpuproxy_operator.api.proxy import (
    SHUTDOWN_MARGIN_SECONDS,
    Admission,
    ModelPrice,
    PriorityClass,
    ProxySpec,
    UpstreamRetry,
)
from gpuproxy_operator.builders.proxy_secrets import secret_files, tls_files
from gpuproxy_operator.naming import Component, child_name

PGBOUNCER_PORT = 6432
# The metering spool's emptyDir: survives container restarts (crash, OOM kill), so the next
# process replays what the last one admitted.
SPOOL_DIR = "/var/spool/gpuproxy"
REDIS_PORT = 6379
# Headroom over connectionsPerReplica before a worker refuses connections (x 1.1): the
# autoscaler reacts to load above the target, so the hard cap must sit above it. A fraction
# keeps the arithmetic exact (100000 * 1.1 is 110000.00000000001 in floats).
CONNECTION_CAP = Fraction(11, 10)


def service_host(cluster: GpuProxyCluster, component: Component) -> str:
    name = child_name(cluster.metadata.name, component)
    return f"{name}.{cluster.metadata.namespace}.svc"


def redis_url(cluster: GpuProxyCluster) -> str:
    redis = cluster.spec.redis
    if redis.mode == "bundled":
        return f"redis://{service_host(cluster, 'redis')}:{REDIS_PORT}/0"
    assert redis.url is not None  # RedisSpec rejects external mode without a url
    return redis.url


def max_connections_per_worker(connections_per_replica: int, workers: int) -> int:
    return math.ceil(connections_per_replica * CONNECTION_CAP / workers)


def termination_grace_seconds(proxy: ProxySpec) -> int:
    """The pod's grace period: the spec's override, else long enough that the drain delay, the
    longest request (or the spread-out idle closes) and the exit all fit before SIGKILL."""
    if proxy.termination_grace_period_seconds is not None:
        return proxy.termination_grace_period_seconds
    shutdown = proxy.shutdown
    return (shutdown.drain_delay_seconds
            + max(proxy.upstream.max_request_seconds, shutdown.idle_close_seconds)
            + SHUTDOWN_MARGIN_SECONDS)


def shutdown_grace_seconds(proxy: ProxySpec) -> int:
    """How long the proxy waits for in-flight requests once its drain delay is over; the API
    rule keeps an override at least drain delay + margin, so this is never negative."""
    return max(0, termination_grace_seconds(proxy) - proxy.shutdown.drain_delay_seconds
               - SHUTDOWN_MARGIN_SECONDS)


def _auth(cluster: GpuProxyCluster) -> dict[str, Any]:
    auth = cluster.spec.proxy.auth
    body: dict[str, Any] = {
        "enabled": auth.enabled,
        "api_key_cache_seconds": auth.api_key_cache_seconds,
        "api_key_cache_max_stale_seconds": auth.api_key_cache_max_stale_seconds,
    }
    if auth.jwt_issuer is not None:
        body["jwt_issuer"] = auth.jwt_issuer
    if auth.jwt_audience is not None:
        body["jwt_audience"] = auth.jwt_audience
    return body


def spool_size_limit(spool_size_mib: int) -> str:
    """The spool emptyDir's sizeLimit: room for a full spool left by a crashed process (until
    its replay) beside the full spool of the new one, and a margin. Past the sizeLimit the
    kubelet evicts the pod, so the proxy's own bound must be reached well before it."""
    return f"{2 * spool_size_mib + 64}Mi"


def admin_api_port(cluster: GpuProxyCluster) -> int | None:
    """The admin API's port, None (not listening) while no admin token is referenced."""
    proxy = cluster.spec.proxy
    return proxy.admin_api_port if proxy.auth.admin_token_secret_ref is not None else None


def _listen(cluster: GpuProxyCluster) -> dict[str, Any]:
    proxy = cluster.spec.proxy
    listen: dict[str, Any] = {"host": "0.0.0.0", "port": proxy.port,
                              "admin_port": proxy.admin_port,
                              "admin_api_port": admin_api_port(cluster)}
    tls = tls_files(cluster)
    if tls is not None:
        listen["tls"] = tls  # paths only: the certificate itself is reloaded by the proxy
    return listen


def _price(price: ModelPrice) -> dict[str, float]:
    return {"input": float(price.input), "output": float(price.output)}


def _retry(retry: UpstreamRetry) -> dict[str, Any]:
    return {"max_attempts": retry.max_attempts, "budget_ratio": retry.budget_percent / 100,
            "min_per_second": float(retry.min_retries_per_second),
            "max_penalty_seconds": float(retry.max_penalty_seconds)}


def _admission(admission: Admission) -> dict[str, Any]:
    priorities = {"default": PriorityClass(), **admission.priorities}
    return {
        "enabled": admission.enabled,
        "max_in_flight_per_backend": admission.max_in_flight_per_backend,
        "max_kv_cache_usage": admission.max_kv_cache_usage_percent / 100,
        "max_engine_queue": admission.max_engine_queue,
        "max_queue": admission.max_queue,
        "queue_timeout_seconds": float(admission.queue_timeout_seconds),
        "retry_after_seconds": admission.retry_after_seconds,
        "priorities": {name: {"weight": float(cls.weight), "users": list(cls.users),
                              "teams": list(cls.teams), "api_keys": list(cls.api_keys)}
                       for name, cls in sorted(priorities.items())},
        "default_priority": admission.default_priority,
    }


def _discovery(cluster: GpuProxyCluster) -> dict[str, Any]:
    """The proxy watches EndpointSlices itself (an operator-pushed ConfigMap would take the
    kubelet's ~60 s sync, past the 5 s promise)."""
    sources = []
    for d in cluster.spec.proxy.backend_discovery:
        source: dict[str, Any] = {"name": d.name, "port": d.port, "scheme": d.scheme,
                                  "health_path": d.health_path}
        if d.service is not None:
            source["service"] = d.service
        else:
            source["selector"] = d.label_selector()
        sources.append(source)
    return {"namespace": cluster.metadata.namespace, "sources": sources}


def build_proxy_config(cluster: GpuProxyCluster) -> dict[str, Any]:
    """Everything one proxy pod needs except secrets, keyed like the proxy's YAML."""
    proxy = cluster.spec.proxy
    rl = proxy.rate_limits
    config: dict[str, Any] = {
        "listen": _listen(cluster),
        "workers": proxy.workers,
        "backends": [
            {
                "name": b.name,
                "url": str(b.url),
                "weight": b.weight,
                "health_path": b.health_path,
                "labels": dict(sorted(b.labels.items())),
            }
            for b in proxy.backends
        ],
        "load_balancing": {"strategy": proxy.load_balancing.strategy,
                           "per_model": dict(sorted(proxy.load_balancing.per_model.items()))},
        "upstream": {
            "connect_timeout_seconds": proxy.upstream.connect_timeout_seconds,
            "read_timeout_seconds": proxy.upstream.read_timeout_seconds,
            "max_connections_per_backend": proxy.upstream.max_connections_per_backend,
            "max_request_seconds": proxy.upstream.max_request_seconds,
            "retry": _retry(proxy.upstream.retry),
        },
        "admission": _admission(proxy.admission),
        "health_check": {
            "interval_seconds": proxy.health_check.interval_seconds,
            "timeout_seconds": proxy.health_check.timeout_seconds,
            "unhealthy_threshold": proxy.health_check.unhealthy_threshold,
            "ejection_seconds": proxy.health_check.ejection_seconds,
        },
        "auth": _auth(cluster),
        "rate_limits": {
            "enabled": rl.enabled,
            "per_ip": rl.per_ip,
            "per_user": rl.per_user,
            "per_api_key": rl.per_api_key,
            "window_seconds": rl.window_seconds,
            "on_redis_failure": rl.on_redis_failure,
            "trusted_proxies": list(rl.trusted_proxies),
            "tokens_per_minute": rl.tokens_per_minute.model_dump(),
            "tokens_per_day": rl.tokens_per_day.model_dump(),
            "default_max_tokens": rl.default_max_tokens,
        },
        "budgets": {
            "enabled": proxy.budgets.enabled,
            "prices": {model: _price(price) for model, price in
                       sorted(proxy.budgets.prices.items())},
            "default_price": _price(proxy.budgets.default_price),
            "stream_extend_tokens": proxy.budgets.stream_extend_tokens,
            "reservation_ttl_seconds": float(proxy.budgets.reservation_ttl_seconds),
        },
        "redis": {"url": redis_url(cluster)},
        "database": {
            "host": service_host(cluster, "pgbouncer"),
            "port": PGBOUNCER_PORT,
            "database": cluster.spec.database.database,
            # PgBouncer has no client-side TLS configured: in-cluster hop, SCRAM auth.
            "sslmode": "disable",
        },
        "limits": {
            "max_connections_per_worker": max_connections_per_worker(
                proxy.connections_per_replica, proxy.workers
            ),
            "max_body_bytes": proxy.max_body_bytes,
            "body_read_timeout_seconds": proxy.client_timeouts.body_seconds,
            "body_min_bytes_per_second": proxy.client_timeouts.body_min_bytes_per_second,
            "client_write_timeout_seconds": proxy.client_timeouts.write_seconds,
            "drain_delay_seconds": proxy.shutdown.drain_delay_seconds,
            "idle_close_seconds": proxy.shutdown.idle_close_seconds,
            "shutdown_grace_seconds": shutdown_grace_seconds(proxy),
        },
        "metering": {
            "spool_dir": SPOOL_DIR,
            "spool_max_bytes": proxy.metering.spool_size_mib * 1024 * 1024,
            "on_spool_full": proxy.metering.on_spool_full,
            "retention_days": proxy.metering.retention_days,
        },
        "secret_files": secret_files(cluster),
    }
    if proxy.backend_discovery:
        # Only then: an unchanged config keeps existing pods (the config hash) on upgrade.
        config["discovery"] = _discovery(cluster)
    return config
