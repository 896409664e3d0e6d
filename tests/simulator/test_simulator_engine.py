"""Engine model: slots and FIFO queueing, KV accounting, prefix-cache hits, LRU eviction, timing."""

from __future__ import annotations

import random

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpuproxy_proxy.simulator.config import EngineConfig
from gpuproxy_proxy.simulator.engine import Engine, RequestTooLarge, SequenceRequest, TokenEvent
from gpuproxy_proxy.simulator.kvcache import KVCache
from gpuproxy_proxy.simulator.metrics import SimulatorMetrics
from gpuproxy_proxy.simulator.tokens import block_hashes, render_chat, tokenize


def request(name: str, prompt: list[int], max_tokens: int = 4) -> SequenceRequest:
    return SequenceRequest(request_id=name, prompt_token_ids=tuple(prompt), max_tokens=max_tokens)


def run_until_idle(engine: Engine, now: float = 0.0) -> tuple[float, list[TokenEvent]]:
    """Steps the engine back to back; returns the final clock and every event."""
    events: list[TokenEvent] = []
    while (end := engine.begin_iteration(now)) is not None:
        events += engine.finish_iteration()
        now = end
    return now, events


def finish_then_run_until_idle(engine: Engine, end: float) -> list[TokenEvent]:
    """Finishes the iteration the caller began (ending at `end`), then runs to idle."""
    events = engine.finish_iteration()
    return events + run_until_idle(engine, end)[1]


def first_token(events: list[TokenEvent], name: str) -> TokenEvent:
    return next(e for e in events if e.request_id == name and e.index == 0)


def test_slots_fill_then_queue_fifo() -> None:
    engine = Engine(EngineConfig(max_num_seqs=2))
    for name in "abcd":
        engine.submit(request(name, list(range(10)), max_tokens=2), now=0.0)
    end = engine.begin_iteration(0.0)
    assert end is not None
    assert (engine.stats().running, engine.stats().waiting) == (2, 2)
    events = finish_then_run_until_idle(engine, end)
    order = [e.request_id for e in events if e.index == 0]
    assert order == ["a", "b", "c", "d"]
    assert engine.stats().finished == {"length": 4}
    assert engine.stats().generation_tokens == 8


def test_head_of_queue_waits_for_kv_space_even_with_free_slots() -> None:
    engine = Engine(EngineConfig(max_num_seqs=8, num_gpu_blocks=10, block_size=4))
    engine.submit(request("big", list(range(20)), max_tokens=12), now=0.0)  # 8 blocks
    engine.submit(request("next", list(range(100, 112)), max_tokens=4), now=0.0)  # 4 blocks
    end = engine.begin_iteration(0.0)
    assert end is not None
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.used_blocks) == (1, 1, 8)
    events = finish_then_run_until_idle(engine, end)
    big_done = next(e.time for e in events if e.request_id == "big" and e.finished)
    assert first_token(events, "next").time > big_done


def test_kv_accounting_never_exceeds_capacity_under_random_load() -> None:
    config = EngineConfig(max_num_seqs=6, num_gpu_blocks=40, block_size=4)
    engine = Engine(config)
    rng = random.Random(13)
    shared = [rng.randrange(1000) for _ in range(24)]
    submitted, now, events = 0, 0.0, []
    for step in range(400):
        if step < 300 and rng.random() < 0.5:
            prompt = shared[:rng.randrange(4, 24)] + [rng.randrange(1000) for _ in range(5)]
            engine.submit(request(f"r{submitted}", prompt, rng.randrange(1, 20)), now)
            submitted += 1
        end = engine.begin_iteration(now)
        stats = engine.stats()
        assert stats.used_blocks <= config.num_gpu_blocks
        assert engine.kv.num_free + engine.kv.num_used == config.num_gpu_blocks
        assert stats.running <= config.max_num_seqs
        assert 0.0 <= stats.kv_usage <= 1.0
        if end is not None:
            events += engine.finish_iteration()
            now = end
    _, rest = run_until_idle(engine, now)
    events += rest
    assert sum(1 for e in events if e.finished) == submitted
    assert engine.kv.num_used == 0  # every finished sequence gave its blocks back
    assert engine.stats().prefix_hits > 0


def test_prefix_hit_lowers_ttft_and_counts_in_hit_counters() -> None:
    config = EngineConfig(block_size=16, prefill_tokens_per_second=1000.0)
    engine = Engine(config)
    shared = list(range(1000, 1400))  # 400 tokens = 25 blocks
    engine.submit(request("cold", [*shared, 1, 2, 3]), now=0.0)
    now, events = run_until_idle(engine)
    engine.submit(request("warm", [*shared, 7, 8, 9]), now=now)
    _, events = run_until_idle(engine, now)
    warm = first_token(events, "warm")
    assert warm.cached_tokens == 400
    stats = engine.stats()
    assert stats.prefix_queries == 2 * 403
    assert stats.prefix_hits == 400
    cold_ttft = engine.prefill_seconds(403)
    assert warm.ttft_seconds == pytest.approx(engine.prefill_seconds(3))
    assert warm.ttft_seconds is not None
    assert warm.ttft_seconds < cold_ttft / 10


def test_single_request_timing_follows_the_documented_formulas() -> None:
    config = EngineConfig(prefill_tokens_per_second=2000.0, prefill_overhead_seconds=0.02,
                          decode_interval_seconds=0.01, decode_slowdown_per_seq=0.5)
    engine = Engine(config)
    engine.submit(request("a", list(range(200)), max_tokens=3), now=0.0)
    engine.submit(request("b", list(range(300, 500)), max_tokens=3), now=0.0)
    _, events = run_until_idle(engine)
    prefill = 0.02 + 200 / 2000.0
    times = [e.time for e in events if e.request_id == "a"]
    decode_two = 0.01 * (1 + 0.5 * 1)
    assert times == pytest.approx([2 * prefill, 2 * prefill + decode_two,
                                   2 * prefill + 2 * decode_two])
    assert first_token(events, "a").ttft_seconds == pytest.approx(2 * prefill)


def test_lru_eviction_drops_least_recently_used_prefix() -> None:
    kv = KVCache(num_blocks=4, block_size=4)
    prefix_a, prefix_b, prefix_c = [11, 12], [21, 22], [31, 32]
    for prefix in (prefix_a, prefix_b):
        allocation = kv.allocate(prefix, 2)
        assert allocation is not None
        assert allocation.hit_blocks == 0
        kv.free(allocation.blocks)
    reused = kv.allocate(prefix_a, 2)  # touching A makes B the least recently used
    assert reused is not None
    assert reused.hit_blocks == 2
    kv.free(reused.blocks)
    fresh = kv.allocate(prefix_c, 2)
    assert fresh is not None
    assert fresh.hit_blocks == 0
    assert kv.cached_prefix(prefix_b) == []
    assert len(kv.cached_prefix(prefix_a)) == 2
    assert kv.evictions == 2
    assert kv.allocate([41, 42, 43], 3) is None  # 2 free, C still holds 2


def test_blocks_in_use_are_never_evicted() -> None:
    kv = KVCache(num_blocks=4, block_size=4)
    held = kv.allocate([1, 2], 2)
    assert held is not None
    assert kv.allocate([5, 6, 7], 3) is None
    other = kv.allocate([5, 6], 2)
    assert other is not None
    assert len(kv.cached_prefix([1, 2])) == 2
    assert kv.usage == 1.0


def test_shared_system_prompt_maps_to_the_same_leading_blocks() -> None:
    system = {"role": "system", "content": "You are a careful assistant. " * 40}
    first = tokenize(render_chat([system, {"role": "user", "content": "What is a GPU?"}]), 4)
    second = tokenize(render_chat([system, {"role": "user", "content": "Name a colour."}]), 4)
    hashes_1, hashes_2 = block_hashes(first, 16, "m"), block_hashes(second, 16, "m")
    shared = sum(1 for a, b in zip(hashes_1, hashes_2, strict=False) if a == b)
    assert shared >= 10
    assert hashes_1[shared:] != hashes_2[shared:]
    assert block_hashes(first, 16, "lora-a")[0] != hashes_1[0]


def test_abort_frees_blocks_and_counts_as_abort() -> None:
    engine = Engine(EngineConfig(max_num_seqs=1))
    engine.submit(request("run", list(range(40)), max_tokens=50), now=0.0)
    engine.submit(request("wait", list(range(40)), max_tokens=50), now=0.0)
    engine.begin_iteration(0.0)
    assert engine.abort("wait")
    assert engine.abort("run")
    assert not engine.abort("run")
    assert engine.finish_iteration() == []
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.used_blocks) == (0, 0, 0)
    assert stats.finished == {"abort": 2}


def test_requests_that_can_never_fit_are_refused() -> None:
    engine = Engine(EngineConfig(num_gpu_blocks=4, block_size=4, max_model_len=64))
    with pytest.raises(RequestTooLarge):
        engine.submit(request("long", list(range(60)), max_tokens=10), now=0.0)
    with pytest.raises(RequestTooLarge):
        engine.submit(request("wide", list(range(14)), max_tokens=4), now=0.0)
    engine.submit(request("fits", list(range(12)), max_tokens=4), now=0.0)


def test_metrics_values_match_engine_state() -> None:
    engine = Engine(EngineConfig(max_num_seqs=1, block_size=4))
    metrics = SimulatorMetrics("sim-model", engine.stats)
    for name in ("a", "b", "c"):
        engine.submit(request(name, list(range(30)), max_tokens=3), now=0.0)
    end = engine.begin_iteration(0.0)
    assert end is not None
    for event in engine.finish_iteration():
        if event.ttft_seconds is not None:
            metrics.ttft.observe(event.ttft_seconds)
    engine.begin_iteration(end)
    samples = {(s.name, s.labels.get("finished_reason", s.labels.get("le"))): s
               for family in text_string_to_metric_families(metrics.render().decode())
               for s in family.samples}
    stats = engine.stats()
    for (name, _), sample in samples.items():
        if name.startswith("vllm:"):
            assert sample.labels["model_name"] == "sim-model"
    assert samples[("vllm:num_requests_running", None)].value == stats.running == 1
    assert samples[("vllm:num_requests_waiting", None)].value == stats.waiting == 2
    assert samples[("vllm:kv_cache_usage_perc", None)].value == pytest.approx(stats.kv_usage)
    assert samples[("vllm:gpu_cache_usage_perc", None)].value == pytest.approx(stats.kv_usage)
    assert stats.kv_usage > 0
    assert samples[("vllm:prefix_cache_queries_total", None)].value == stats.prefix_queries == 30
    assert samples[("vllm:prefix_cache_hits_total", None)].value == stats.prefix_hits == 0
    assert samples[("vllm:time_to_first_token_seconds_count", None)].value == 1
    assert samples[("vllm:time_to_first_token_seconds_bucket", "+Inf")].value == 1
    assert samples[("vllm:request_success_total", "length")].value == 0
