"""Prometheus metrics of one proxy process, on a registry owned by the app (no module globals).

Names follow the deployment guide's alert rules; label sets are bounded (backend names come
from config, routes from a fixed list, status codes are grouped into classes).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Milliseconds; the guide alerts on p99 > 5000 ms, so buckets resolve well around it.
DURATION_BUCKETS_MS = (
    5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 30000.0,
    60000.0, 120000.0, 300000.0,
)

# The target is no pause over 50 ms; full collections with many connections reach 600+.
GC_BUCKETS_MS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 250.0, 500.0, 1000.0)


@dataclass
class ProxyMetrics:
    registry: CollectorRegistry = field(
        default_factory=lambda: CollectorRegistry(auto_describe=True)
    )

    def __post_init__(self) -> None:
        r = self.registry
        self.requests_total = Counter(
            "gpuproxy_requests", "Requests handled.", ["route", "code_class"], registry=r
        )
        # Exposed as gpuproxy_requests_failed_total (a counter), which the alert rules use.
        self.requests_failed = Counter(
            "gpuproxy_requests_failed", "Requests answered with a 5xx status.", ["route"],
            registry=r,
        )
        self.request_duration_ms = Histogram(
            "gpuproxy_request_duration_milliseconds",
            "Time from request received to response finished, in milliseconds.",
            ["route"], buckets=DURATION_BUCKETS_MS, registry=r,
        )
        self.connections_active = Gauge(
            "gpuproxy_connections_active", "Open client connections.", registry=r
        )
        self.requests_in_flight = Gauge(
            "gpuproxy_requests_in_flight", "Requests being processed.", registry=r
        )
        self.db_connections_active = Gauge(
            "gpuproxy_db_connections_active", "Database pool connections in use.", registry=r
        )
        self.db_connections_max = Gauge(
            "gpuproxy_db_connections_max", "Database pool size limit.", registry=r
        )
        self.backend_healthy = Gauge(
            "gpuproxy_backend_healthy", "1 when the backend takes traffic.", ["backend"],
            registry=r,
        )
        self.backend_requests_in_flight = Gauge(
            "gpuproxy_backend_requests_in_flight", "Requests in flight per backend.",
            ["backend"], registry=r,
        )
        self.backend_failures = Counter(
            "gpuproxy_backend_failures", "Upstream failures per backend.", ["backend", "reason"],
            registry=r,
        )
        self.upstream_retries = Counter(
            "gpuproxy_upstream_retries", "Requests retried on another backend before any byte "
            "reached the client.", ["reason"], registry=r,
        )
        self.upstream_retry_budget_exhausted = Counter(
            "gpuproxy_upstream_retry_budget_exhausted",
            "Retries not made because the retry budget was spent.", registry=r,
        )
        # Summed over the workers on /metrics: the pod's queue, a KEDA/HPA scaling signal.
        self.admission_queue_depth = Gauge(
            "gpuproxy_admission_queue_depth", "Requests waiting for a backend with capacity.",
            registry=r,
        )
        self.admission_wait_seconds = Histogram(
            "gpuproxy_admission_wait_seconds", "Time requests waited in the admission queue.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.admission_rejections = Counter(
            "gpuproxy_admission_rejections", "Requests refused by the admission queue.",
            ["reason"], registry=r,
        )
        self.ratelimit_rejections = Counter(
            "gpuproxy_ratelimit_rejections", "Requests rejected by a rate limit.", ["scope"],
            registry=r,
        )
        self.token_limit_rejections = Counter(
            "gpuproxy_token_limit_rejections", "Requests rejected by a token limit.", ["scope"],
            registry=r,
        )
        self.budget_rejections = Counter(
            "gpuproxy_budget_rejections", "Requests whose reservation a budget did not cover.",
            ["scope"], registry=r,
        )
        self.budget_stream_cuts = Counter(
            "gpuproxy_budget_stream_cuts", "Streams ended because a budget was reached.",
            registry=r,
        )
        self.ratelimit_fallback = Counter(
            "gpuproxy_ratelimit_fallback",
            "Rate-limit decisions taken without Redis (Redis unreachable).", ["mode"], registry=r,
        )
        self.usage_records_buffered = Gauge(
            "gpuproxy_usage_records_buffered", "Usage records waiting to be written.", registry=r
        )
        self.usage_records_written = Counter(
            "gpuproxy_usage_records_written", "Usage records written to the database.", registry=r
        )
        self.tokens_estimated = Counter(
            "gpuproxy_tokens_estimated",
            "Tokens recorded from the tokenizer-free estimate (the backend reported no usage).",
            ["route"], registry=r,
        )
        # Bounded labels (metering/spend.py): a team ("" for keys without one) and a model of
        # the price table or "other"; per key and per user live in the database (/admin/spend).
        self.spend_usd = Counter(
            "gpuproxy_spend_usd",
            "Spend in USD from the price table (budgets.prices), as requests settle.",
            ["team", "model"], registry=r,
        )
        self.tokens = Counter(
            "gpuproxy_tokens",
            "Tokens used (the backend's counts, else the estimate), as requests settle.",
            ["team", "model", "kind"], registry=r,
        )
        self.usage_records_dropped = Counter(
            "gpuproxy_usage_records_dropped", "Usage records dropped (buffer full).", registry=r
        )
        self.metering_spool_bytes = Gauge(
            "gpuproxy_metering_spool_bytes",
            "Bytes of this process's metering spool on disk (records not yet committed).",
            registry=r,
        )
        self.metering_spool_oldest_seconds = Gauge(
            "gpuproxy_metering_spool_oldest_seconds",
            "Age of the oldest spool segment still needed (0 when the spool is empty).",
            registry=r,
        )
        self.metering_spool_full = Counter(
            "gpuproxy_metering_spool_full",
            "Spool-full events by policy: requests rejected (reject), or records whose spool "
            "copy was deleted (drop_oldest).", ["action"], registry=r,
        )
        self.metering_spool_write_errors = Counter(
            "gpuproxy_metering_spool_write_errors",
            "Spool writes that failed (e.g. disk full); those records are kept in memory only.",
            registry=r,
        )
        self.metering_replayed = Counter(
            "gpuproxy_metering_replayed_records",
            "Usage records replayed from spools of processes that did not exit cleanly.",
            ["outcome"], registry=r,
        )
        # gpuproxy_gc_pause_milliseconds is collected at scrape time by gcwatch.GcMonitor.
        self.gc_frozen_objects = Gauge(
            "gpuproxy_gc_frozen_objects",
            "Objects in the garbage collector's permanent generation (gc.freeze); the periodic "
            "reclaim keeps it bounded.", registry=r,
        )
        self.gc_frozen_objects.set_function(_frozen_objects)
        self.api_key_lookups = Counter(
            "gpuproxy_api_key_lookups",
            "API-key checks the cache could not answer, by outcome: found, unknown, timeout, "
            "error (database queries); coalesced (joined a pending query for the same key), "
            "overloaded (too many pending: 503), unavailable (database down: 503), stale "
            "(cached entry served during an outage), too_old (cached entry past its maximum "
            "age: 503).", ["outcome"], registry=r,
        )
        self.api_key_revocations_received = Counter(
            "gpuproxy_api_key_revocations_received",
            "Revocations received on the Redis channel (each evicts the key here).", registry=r,
        )
        self.api_key_revocations_published = Counter(
            "gpuproxy_api_key_revocations_published",
            "Revocations this process published to the other processes, by result (ok, "
            "failed: they see it after the cache TTL).", ["result"], registry=r,
        )
        self.api_key_revocation_feed_up = Gauge(
            "gpuproxy_api_key_revocation_feed_up",
            "1 while this process is subscribed to the revocation channel (a pod sums its "
            "workers).", registry=r,
        )
        self.api_key_revocation_subscriptions = Counter(
            "gpuproxy_api_key_revocation_subscriptions",
            "Subscriptions to the revocation channel, the first and every one after a "
            "reconnect (each makes every cached key be checked again).", registry=r,
        )
        # Engine signals (routing/signals.py), read at scrape time from each backend's state;
        # the same in every worker, so the pod's merge takes the max (aggregate.py).
        self.backend_queue_depth = Gauge(
            "gpuproxy_backend_queue_depth", "Requests waiting at the engine, last scrape.",
            ["backend"], registry=r,
        )
        self.backend_running = Gauge(
            "gpuproxy_backend_running_requests", "Requests running at the engine, last scrape.",
            ["backend"], registry=r,
        )
        self.backend_kv_cache_usage = Gauge(
            "gpuproxy_backend_kv_cache_usage", "Engine KV-cache use (0..1), last scrape.",
            ["backend"], registry=r,
        )
        self.backend_prefix_hit_rate = Gauge(
            "gpuproxy_backend_prefix_cache_hit_rate",
            "Share of prompt tokens the engine served from its prefix cache between scrapes.",
            ["backend"], registry=r,
        )
        self.backend_signals_age = Gauge(
            "gpuproxy_backend_signals_age_seconds",
            "Age of the backend's engine signals (+Inf: none yet).", ["backend"], registry=r,
        )
        self.routing_decisions = Counter(
            "gpuproxy_routing_decisions", "Backend choices by strategy and reason.",
            ["strategy", "reason"], registry=r,
        )
        self.connections_rejected = Counter(
            "gpuproxy_connections_rejected", "Connections or requests refused by admission.",
            ["reason"], registry=r,
        )
        # outcome: "failed" (no, malformed or wrong admin token), "locked_out" (429, the IP
        # failed too often; its token was not compared).
        self.admin_auth_refused = Counter(
            "gpuproxy_admin_auth_refused", "Admin API requests refused by authentication.",
            ["outcome"], registry=r,
        )
        # phase: head, body (answered 408) or write (a client that stopped reading, aborted).
        self.client_timeouts = Counter(
            "gpuproxy_client_timeouts", "Client connections ended by a client-side deadline.",
            ["phase"], registry=r,
        )
        # result: reloaded (a rotated pair is in use) or error (refused, the old one stays).
        self.tls_certificate_reloads = Counter(
            "gpuproxy_tls_certificate_reloads",
            "Client-port TLS certificate reloads after the files changed.", ["result"],
            registry=r,
        )

    def track_tls_expiry(self, not_after: Callable[[], float | None]) -> None:
        """Only with TLS on: a plain-HTTP proxy exports no expiry at all (not a 0)."""
        gauge = Gauge(
            "gpuproxy_tls_certificate_expiry_timestamp_seconds",
            "notAfter of the client-port certificate new connections get (Unix time); the pod "
            "shows the earliest over its workers.", registry=self.registry,
        )
        gauge.set_function(lambda: not_after() or float("nan"))


def _frozen_objects() -> float:
    return float(gc.get_freeze_count())  # read at scrape time
