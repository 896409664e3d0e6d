"""OpenAI usage extraction from JSON bodies and SSE streams; merging of worker stats/metrics.

The parsers of bodies of every shape and size: test_metering_usage_parsers.py."""

from __future__ import annotations

import json

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gpuproxy_proxy.metering.sse_usage import SseUsage
from gpuproxy_proxy.metering.usage import Usage, usage_from_json
from gpuproxy_proxy.observability.aggregate import merge_metrics, merge_stats
from gpuproxy_proxy.observability.metrics import ProxyMetrics


def test_usage_from_json_body() -> None:
    body = json.dumps({"usage": {"prompt_tokens": 3, "completion_tokens": 4,
                                 "total_tokens": 7}}).encode()
    assert usage_from_json(body) == Usage(3, 4, 7)
    assert usage_from_json(b'{"choices": []}') is None
    assert usage_from_json(b'{"usage": null}') is None
    assert usage_from_json(b'not json "usage"') is None
    assert usage_from_json(b'{"usage": {"prompt_tokens": 5}}') == Usage(5, None, 5)


def _events(*objs: object) -> bytes:
    return b"".join(f"data: {json.dumps(o)}\n\n".encode() for o in objs) + b"data: [DONE]\n\n"


def test_sse_usage_in_last_chunk_even_when_split() -> None:
    stream = _events(
        {"choices": [{"delta": {"content": "a"}}], "usage": None},
        {"choices": [{"delta": {"content": "usage"}}], "usage": None},
        {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 2,
                                  "total_tokens": 13}},
    )
    for size in (1, 7, 64, len(stream)):
        scanner = SseUsage(strip=False)
        for i in range(0, len(stream), size):
            scanner.feed(stream[i:i + size])
        assert scanner.result() == Usage(11, 2, 13), size


def test_sse_without_usage() -> None:
    scanner = SseUsage(strip=False)
    scanner.feed(_events({"choices": [], "usage": None}))
    assert scanner.result() is None


def test_merge_stats_sums_workers() -> None:
    w1 = {"pid": 1, "worker": 0, "connections_active": 10, "requests_in_flight": 2,
          "backends": {"a": {"state": "healthy", "in_flight": 1, "ewma_ms": 5.0}}}
    w2 = {"pid": 2, "worker": 1, "connections_active": 5, "requests_in_flight": 1,
          "backends": {"a": {"state": "ejected", "in_flight": 3, "ewma_ms": 9.0}}}
    merged = merge_stats([w1, w2])
    assert merged["connections_active"] == 15
    assert merged["requests_in_flight"] == 3
    assert merged["workers"] == 2
    backend = merged["backends"]["a"]
    assert backend["in_flight"] == 4
    assert backend["state"] == "ejected"
    assert backend["healthy_workers"] == 1


def test_merge_metrics_sums_counters_and_histograms() -> None:
    texts = []
    for n in (1, 2):
        metrics = ProxyMetrics()
        metrics.requests_total.labels("chat_completions", "2xx").inc(n)
        metrics.request_duration_ms.labels("chat_completions").observe(7.0 * n)
        metrics.connections_active.set(100 * n)
        metrics.backend_healthy.labels("a").set(1)
        texts.append(generate_latest(metrics.registry).decode())
    merged = merge_metrics(texts).decode()
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for fam in text_string_to_metric_families(merged) for s in fam.samples}
    assert values[("gpuproxy_requests_total",
                   (("code_class", "2xx"), ("route", "chat_completions")))] == 3
    assert values[("gpuproxy_connections_active", ())] == 300
    assert values[("gpuproxy_backend_healthy", (("backend", "a"),))] == 1
    assert values[("gpuproxy_request_duration_milliseconds_count",
                   (("route", "chat_completions"),))] == 2
    assert values[("gpuproxy_request_duration_milliseconds_bucket",
                   (("le", "10.0"), ("route", "chat_completions")))] == 1
    assert "# TYPE gpuproxy_request_duration_milliseconds histogram" in merged
