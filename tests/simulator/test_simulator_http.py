"""A real simulator server on loopback: OpenAI shapes, SSE, vLLM metrics, queueing, the CLI."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpuproxy_proxy.simulator.app import start_server
from gpuproxy_proxy.simulator.config import EngineConfig, SimulatorConfig

DEADLINE_SECONDS = 60.0
SYSTEM_PROMPT = "You are the simulated assistant of a GPU proxy test suite. " * 30

VLLM_SAMPLES = (
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:gpu_cache_usage_perc",
    "vllm:kv_cache_usage_perc", "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total", "vllm:time_to_first_token_seconds_bucket",
    "vllm:time_to_first_token_seconds_count", "vllm:request_success_total",
)


async def serve(config: SimulatorConfig) -> AsyncIterator[str]:
    runner, port = await start_server(config, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def fast_server() -> AsyncIterator[str]:
    """Simulated time 100x faster than the wall clock."""
    config = SimulatorConfig(lora_adapters=("sql-lora",), time_scale=0.01)
    async for url in serve(config):
        yield url


@pytest.fixture
async def one_slot_server() -> AsyncIterator[str]:
    """One batch slot and real-time pacing, so a long request holds the slot for minutes."""
    config = SimulatorConfig(engine=EngineConfig(max_num_seqs=1, max_model_len=100_000,
                                                 num_gpu_blocks=8192))
    async for url in serve(config):
        yield url


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as client:
        yield client


async def metric_samples(session: aiohttp.ClientSession, url: str,
                         model: str = "sim-llama-3-8b") -> dict[str, float]:
    """Sample name (`|le` or `|finished_reason` appended) -> value, for this server's model."""
    async with session.get(f"{url}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert sample.labels["model_name"] == model
            key = sample.name
            for label in ("le", "finished_reason"):
                if label in sample.labels:
                    key += "|" + sample.labels[label]
            samples[key] = sample.value
    return samples


async def wait_for_metric(session: aiohttp.ClientSession, url: str, name: str,
                          value: float) -> dict[str, float]:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while True:
        samples = await metric_samples(session, url)
        if samples.get(name) == value:
            return samples
        assert time.monotonic() < deadline, f"{name} never reached {value}: {samples.get(name)}"
        await asyncio.sleep(0.05)


def sse_chunks(body: str) -> list[dict[str, Any]]:
    """Parses an SSE body; asserts it is `data:` events ending with [DONE]."""
    events = [event for event in body.split("\n\n") if event]
    assert all(event.startswith("data: ") for event in events)
    assert events[-1] == "data: [DONE]"
    return [json.loads(event.removeprefix("data: ")) for event in events[:-1]]


async def test_models_lists_served_name_and_lora_adapter(
        fast_server: str, session: aiohttp.ClientSession) -> None:
    async with session.get(f"{fast_server}/v1/models") as response:
        body = await response.json()
    assert [m["id"] for m in body["data"]] == ["sim-llama-3-8b", "sql-lora"]
    assert body["data"][1]["parent"] == "sim-llama-3-8b"
    async with session.get(f"{fast_server}/health") as response:
        assert response.status == 200


async def test_non_streamed_chat_and_completion_shapes(
        fast_server: str, session: aiohttp.ClientSession) -> None:
    chat = {"model": "sim-llama-3-8b", "max_tokens": 7,
            "messages": [{"role": "user", "content": "Say something."}]}
    async with session.post(f"{fast_server}/v1/chat/completions", json=chat) as response:
        assert response.status == 200
        body = await response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] == "length"
    usage = body["usage"]
    assert usage["completion_tokens"] == 7
    assert usage["total_tokens"] == usage["prompt_tokens"] + 7
    text = {"model": "sql-lora", "prompt": "Once upon a time"}
    async with session.post(f"{fast_server}/v1/completions", json=text) as response:
        body = await response.json()
    assert body["object"] == "text_completion"
    assert body["model"] == "sql-lora"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == SimulatorConfig().default_max_tokens


async def test_streamed_chat_is_valid_sse_with_final_usage(
        fast_server: str, session: aiohttp.ClientSession) -> None:
    request = {"messages": [{"role": "user", "content": "Stream please."}], "max_tokens": 5,
               "stream": True, "stream_options": {"include_usage": True}}
    async with session.post(f"{fast_server}/v1/chat/completions", json=request) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        chunks = sse_chunks(await response.text())
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    *token_chunks, finish_chunk, usage_chunk = chunks
    assert len(token_chunks) == 5
    assert all(c["choices"][0]["finish_reason"] is None for c in token_chunks)
    assert finish_chunk["choices"][0]["finish_reason"] == "length"
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 5
    assert all("usage" not in c for c in (*token_chunks, finish_chunk))  # as vLLM's
    streamed_text = "".join(c["choices"][0]["delta"]["content"] for c in token_chunks)
    request.pop("stream"), request.pop("stream_options")
    async with session.post(f"{fast_server}/v1/chat/completions", json=request) as response:
        body = await response.json()
    assert body["choices"][0]["message"]["content"] == streamed_text


async def test_streamed_completion_without_usage_option(
        fast_server: str, session: aiohttp.ClientSession) -> None:
    request = {"prompt": "Count:", "max_tokens": 3, "stream": True}
    async with session.post(f"{fast_server}/v1/completions", json=request) as response:
        chunks = sse_chunks(await response.text())
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "length"]
    assert all("usage" not in c for c in chunks)


async def test_shared_system_prompt_hits_prefix_cache_and_metrics_carry_vllm_names(
        fast_server: str, session: aiohttp.ClientSession) -> None:
    cached = []
    for question in ("What is a KV cache?", "What is a batch slot?"):
        chat = {"max_tokens": 2, "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                              {"role": "user", "content": question}]}
        async with session.post(f"{fast_server}/v1/chat/completions", json=chat) as response:
            body = await response.json()
        cached.append(body["usage"]["prompt_tokens_details"]["cached_tokens"])
        prompt_tokens = body["usage"]["prompt_tokens"]
    assert cached[0] == 0
    assert 0 < cached[1] < prompt_tokens
    samples = await metric_samples(session, fast_server)
    assert set(VLLM_SAMPLES) <= {key.split("|")[0] for key in samples}
    assert samples["vllm:prefix_cache_hits_total"] == cached[1]
    assert samples["vllm:prefix_cache_queries_total"] >= 2 * prompt_tokens - 20
    assert samples["vllm:request_success_total|length"] == 2
    assert samples["vllm:time_to_first_token_seconds_count"] == 2
    # Reported in simulated seconds (time_scale 0.01): at least the prefill overhead each.
    overhead = SimulatorConfig().engine.prefill_overhead_seconds
    assert samples["vllm:time_to_first_token_seconds_sum"] >= 2 * overhead


async def test_errors_use_openai_shape(fast_server: str, session: aiohttp.ClientSession) -> None:
    unknown = {"model": "nope", "prompt": "x"}
    async with session.post(f"{fast_server}/v1/completions", json=unknown) as response:
        assert response.status == 404
        assert "nope" in (await response.json())["error"]["message"]
    too_long = {"prompt": "x", "max_tokens": 10_000}
    async with session.post(f"{fast_server}/v1/completions", json=too_long) as response:
        assert response.status == 400
        assert (await response.json())["error"]["type"] == "BadRequestError"


async def test_full_slots_show_in_waiting_and_a_hang_up_frees_the_slot(
        one_slot_server: str, session: aiohttp.ClientSession) -> None:
    url = one_slot_server
    long_request = {"prompt": "hold the slot", "max_tokens": 20_000, "stream": True}
    holder = await session.post(f"{url}/v1/completions", json=long_request)
    assert (await holder.content.readline()).startswith(b"data: ")
    short_request = {"prompt": "queued", "max_tokens": 3}
    queued = [asyncio.create_task(session.post(f"{url}/v1/completions", json=short_request))
              for _ in range(2)]
    samples = await wait_for_metric(session, url, "vllm:num_requests_waiting", 2)
    assert samples["vllm:num_requests_running"] == 1
    assert samples["vllm:kv_cache_usage_perc"] > 0
    holder.close()  # the client hangs up: the server aborts it and the queue drains
    samples = await wait_for_metric(session, url, "vllm:request_success_total|length", 2)
    assert samples["vllm:request_success_total|abort"] == 1
    assert samples["vllm:num_requests_waiting"] == 0
    for task in queued:
        response = await task
        assert (await response.json())["usage"]["completion_tokens"] == 3
    samples = await wait_for_metric(session, url, "vllm:num_requests_running", 0)
    assert samples["vllm:kv_cache_usage_perc"] == 0


async def test_cli_prints_one_ready_line_and_serves(session: aiohttp.ClientSession) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gpuproxy_proxy.simulator", "--port", "0", "--model", "cli-model",
        "--lora", "cli-lora", "--time-scale", "0.01", stdout=asyncio.subprocess.PIPE)
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), DEADLINE_SECONDS)).decode()
        assert line.startswith("gpuproxy-simulator ready on http://127.0.0.1:")
        url = line.split()[3]
        async with session.get(f"{url}/v1/models") as response:
            ids = [m["id"] for m in (await response.json())["data"]]
        assert ids == ["cli-model", "cli-lora"]
        samples = await metric_samples(session, url, model="cli-model")
        assert samples["vllm:num_requests_running"] == 0
    finally:
        process.terminate()
        assert await asyncio.wait_for(process.wait(), DEADLINE_SECONDS) == 0


async def test_two_instances_side_by_side_keep_separate_state(
        session: aiohttp.ClientSession) -> None:
    configs = [SimulatorConfig(served_model_names=(name,), time_scale=0.01)
               for name in ("left-model", "right-model")]
    async for left in serve(configs[0]):
        async for right in serve(configs[1]):
            request = {"model": "left-model", "prompt": "only on the left", "max_tokens": 2}
            async with session.post(f"{left}/v1/completions", json=request) as response:
                assert response.status == 200
            left_samples = await metric_samples(session, left, model="left-model")
            right_samples = await metric_samples(session, right, model="right-model")
            assert left_samples["vllm:request_success_total|length"] == 1
            assert right_samples["vllm:request_success_total|length"] == 0
