"""Streams from the vLLM simulator through the proxy: every stream's usage is exact, and the
usage chunk the proxy asked for never reaches a client that did not ask for it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from tests.proxy.conftest import ProxyFactory, proxy_config
from tests.proxy.fakes import RecordingMeter

from gpuproxy_proxy.routes import PIPELINE
from gpuproxy_proxy.simulator.app import start_server
from gpuproxy_proxy.simulator.config import SimulatorConfig


@pytest.fixture
async def simulator() -> AsyncIterator[str]:
    runner, port = await start_server(SimulatorConfig(time_scale=0.01), "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def chunks(text: str) -> list[Any]:
    events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


@pytest.mark.parametrize(("path", "request_body"), [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Stream me a poem."}]}),
    ("/v1/completions", {"prompt": "Once upon a time"}),
])
async def test_simulator_streams_have_exact_usage(
        simulator: str, make_proxy: ProxyFactory, path: str,
        request_body: dict[str, Any]) -> None:
    client = await make_proxy(proxy_config(
        [], backends=[{"name": "sim", "url": simulator}]))
    pipeline = client.app[PIPELINE]
    meter = RecordingMeter()
    pipeline.meter, pipeline.metering_on = meter, True
    request = {**request_body, "max_tokens": 6}
    resp = await client.post(path, json=request)  # not streamed: the simulator's own count
    prompt_tokens = (await resp.json())["usage"]["prompt_tokens"]

    resp = await client.post(path, json={**request, "stream": True})
    plain = chunks(await resp.text())
    assert all("usage" not in c for c in plain)  # as the client asked: no usage chunk
    assert len(plain) == 7  # six tokens and the finish chunk

    asked = {**request, "stream": True, "stream_options": {"include_usage": True}}
    resp = await client.post(path, json=asked)
    *body, usage_chunk = chunks(await resp.text())
    assert len(body) == len(plain)  # the same chunks, then the usage one
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 6

    for rec in meter.records:
        assert (rec.prompt_tokens, rec.completion_tokens, rec.total_tokens, rec.estimated) == (
            prompt_tokens, 6, prompt_tokens + 6, False)
    assert len(meter.records) == 3
