"""Engine signals and request hints, the pure parts: metrics pages of vLLM, SGLang and TGI,
model lists, the snapshot file, prefix and session keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpuproxy_proxy.observability.aggregate import merge_stats
from gpuproxy_proxy.routing.hints import prefix_key, prefix_span, request_model, session_key
from gpuproxy_proxy.routing.signals import (
    BackendSignals,
    MetricsFormatError,
    parse_metrics,
    parse_models,
    read_snapshot,
    write_snapshot,
)
from gpuproxy_proxy.simulator.engine import EngineStats
from gpuproxy_proxy.simulator.metrics import SimulatorMetrics

VLLM_OLD_ONLY = """\
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 3.0
vllm:num_requests_waiting{engine="1",model_name="m"} 2.0
vllm:num_requests_running{engine="0",model_name="m"} 7.0
vllm:num_requests_running{engine="1",model_name="m"} 5.0
vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.5
vllm:gpu_cache_usage_perc{engine="1",model_name="m"} 0.7
vllm:gpu_prefix_cache_queries_total{engine="0",model_name="m"} 1000.0
vllm:gpu_prefix_cache_hits_total{engine="0",model_name="m"} 250.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="m"} 4.0
"""

SGLANG = """\
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="qwen",tp_rank="0"} 4.0
sglang:num_running_reqs{model_name="qwen",tp_rank="0"} 9.0
sglang:token_usage{model_name="qwen",tp_rank="0"} 0.42
sglang:cache_hit_rate{model_name="qwen",tp_rank="0"} 0.8
sglang:gen_throughput{model_name="qwen",tp_rank="0"} 123.0
"""

TGI = """\
# TYPE tgi_queue_size gauge
tgi_queue_size 6
tgi_batch_current_size 11
tgi_request_count 500
"""


def stats(queries: int, hits: int) -> EngineStats:
    return EngineStats(running=5, waiting=2, kv_usage=0.25, used_blocks=0, cached_blocks=0,
                       evictions=0, prefix_queries=queries, prefix_hits=hits, prompt_tokens=0,
                       generation_tokens=0, finished={})


def test_vllm_page_of_the_simulator_with_both_kv_names() -> None:
    text = SimulatorMetrics("m", lambda: stats(400, 100)).render().decode()
    first = parse_metrics(text, 10.0)
    assert (first.engine, first.waiting, first.running, first.kv_usage) == ("vllm", 2, 5, 0.25)
    assert (first.prefix_queries, first.prefix_hits, first.prefix_hit_rate) == (400, 100, None)
    page = SimulatorMetrics("m", lambda: stats(600, 250)).render().decode()
    second = parse_metrics(page, 11.0, first)
    assert second.prefix_hit_rate == pytest.approx(150 / 200)  # between the two scrapes
    assert second.scraped_at == 11.0


def test_vllm_old_names_and_data_parallel_engines() -> None:
    sig = parse_metrics(VLLM_OLD_ONLY, 1.0)
    assert (sig.waiting, sig.running) == (5, 12)  # summed over engines
    assert sig.kv_usage == pytest.approx(0.6)  # a fraction: averaged
    assert (sig.prefix_queries, sig.prefix_hits) == (1000, 250)


def test_sglang_and_tgi_equivalents() -> None:
    sg = parse_metrics(SGLANG, 1.0)
    assert (sg.engine, sg.waiting, sg.running, sg.kv_usage, sg.prefix_hit_rate) == (
        "sglang", 4, 9, 0.42, 0.8)
    tgi = parse_metrics(TGI, 1.0)
    assert (tgi.engine, tgi.waiting, tgi.running, tgi.kv_usage) == ("tgi", 6, 11, None)


@pytest.mark.parametrize("text", [
    "# nothing here\nprocess_cpu_seconds_total 3\n",
    "vllm:num_requests_waiting{engine=\"0\"} many\n",
    "vllm:num_requests_waiting\n",
])
def test_pages_without_usable_engine_numbers_are_refused(text: str) -> None:
    with pytest.raises(MetricsFormatError):
        parse_metrics(text, 1.0)


def test_model_ids_include_lora_adapters() -> None:
    payload = json.dumps({"object": "list", "data": [
        {"id": "base", "object": "model"},
        {"id": "tenant-a", "object": "model", "parent": "base"},
        {"object": "model"}]}).encode()
    assert parse_models(payload) == ("base", "tenant-a")
    with pytest.raises(ValueError, match="no data list"):
        parse_models(b'{"detail": "not found"}')


def test_snapshot_round_trip(tmp_path: Path) -> None:
    signals = {"a": BackendSignals(scraped_at=5.0, engine="vllm", waiting=1, running=2,
                                   kv_usage=0.5, models=("m",), models_at=4.0),
               "b": BackendSignals(error="HTTP 404")}
    path = tmp_path / "signals.json"
    write_snapshot(path, signals)
    assert read_snapshot(path) == signals
    assert not (tmp_path / "signals.json.tmp").exists()


def chat(system: str | None, text: str, model: str = "m", **extra: object) -> bytes:
    messages = ([{"role": "system", "content": system}] if system is not None else [])
    messages.append({"role": "user", "content": text})
    return json.dumps({"model": model, "messages": messages, **extra}).encode()


def test_prefix_key_is_the_system_message_whatever_follows() -> None:
    system = "You are the assistant of tenant 7. " * 40 + 'with "quotes" and \\ slashes'
    one = prefix_key(chat(system, "hello"), "m", 512, 8192)
    two = prefix_key(chat(system, "something else entirely", max_tokens=5), "m", 512, 8192)
    other = prefix_key(chat(system + "!", "hello"), "m", 512, 8192)
    assert one is not None
    assert one == two
    assert other != one
    assert prefix_key(chat(system, "hello"), "other-model", 512, 8192) != one
    view = prefix_span(chat(system, "hello"), 512, 8192)
    assert view is not None
    span = bytes(view)
    assert span.endswith(b'slashes"')
    assert b"hello" not in span
    # Content before role, as some clients write it: the same system text, its own key.
    reordered = json.dumps({"model": "m", "messages": [
        {"content": system, "role": "system"}, {"role": "user", "content": "hello"}]}).encode()
    other_order = prefix_span(reordered, 512, 8192)
    assert other_order is not None
    assert bytes(other_order).endswith(b'"role": "system"')
    assert prefix_key(reordered, "m", 512, 8192) == prefix_key(
        reordered.replace(b"hello", b"bye"), "m", 512, 8192)


def test_prefix_key_without_system_message_uses_the_first_bytes() -> None:
    long_start = "x" * 600
    assert prefix_key(chat(None, long_start + "a"), "m", 512, 8192) == prefix_key(
        chat(None, long_start + "b"), "m", 512, 8192)
    prompt = json.dumps({"model": "m", "prompt": "p" * 100}).encode()
    assert prefix_key(prompt, "m", 64, 8192) == prefix_key(
        json.dumps({"model": "m", "prompt": "p" * 100 + "tail"}).encode(), "m", 64, 8192)
    assert prefix_key(b'{"input": "embed me"}', None, 64, 8192) is None
    # A long system prompt is keyed on its first max bytes.
    big = "s" * 5000
    assert prefix_key(chat(big + "1", "u"), "m", 64, 1024) == prefix_key(
        chat(big + "2", "u"), "m", 64, 1024)


def test_model_and_session_from_raw_bytes() -> None:
    body = chat("be brief", 'say "model": no', model="llama-lora-7", user="alice")
    assert request_model(body) == "llama-lora-7"
    assert request_model(b'{"messages": []}') is None
    alice = session_key({}, body, "x-session-id")
    assert alice is not None
    assert alice == session_key({}, chat("x", "y", user="alice"),
                                                      "x-session-id")
    assert session_key({}, chat("x", "y", user="bob"), "x-session-id") != alice
    by_header = session_key({"x-session-id": "s1"}, body, "x-session-id")
    assert by_header not in (None, alice)
    assert session_key({}, chat("x", "y"), "x-session-id") is None


def test_pod_stats_show_the_newest_signals_any_worker_holds() -> None:
    def worker(age: float | None) -> dict[str, object]:
        signals = None if age is None else {"age_seconds": age, "waiting": age}
        return {"backends": {"a": {"state": "healthy", "in_flight": 1, "signals": signals}}}

    merged = merge_stats([worker(None), worker(0.9), worker(0.2), worker(3.0)])
    assert merged["backends"]["a"]["signals"] == {"age_seconds": 0.2, "waiting": 0.2}
    assert "signals" not in merge_stats([worker(None)])["backends"]["a"]
