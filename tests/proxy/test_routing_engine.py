"""Engine-aware routing through real proxy processes (2 workers: the supervisor scrapes, the
workers read its snapshot; 1 worker: it scrapes itself) in front of simulated vLLM servers:
least_load avoids a queue, prefix_affinity keeps a system prompt on one backend and spills when
it is loaded, a model served by one backend goes there only, and stale signals fall back to
connection counts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from tests.proxy.conftest import proxy_config
from tests.proxy.fakes import free_port
from tests.proxy.procs import ProxyProcess, start_proxy, write_config

from gpuproxy_proxy.config import ProxyConfig
from gpuproxy_proxy.simulator.app import start_server
from gpuproxy_proxy.simulator.config import EngineConfig, SimulatorConfig

MODEL = "sim-llama-3-8b"
# Long enough that a prefix-cache hit is most of a request's prompt tokens.
SYSTEM = "You are the support assistant of tenant {0}. Answer briefly and politely. " * 12


@dataclass
class Sim:
    name: str
    url: str
    runner: web.AppRunner


@pytest.fixture
async def sims() -> AsyncIterator[Callable[..., Any]]:
    started: list[Sim] = []

    async def start(name: str, **config: Any) -> Sim:
        engine = config.pop("engine", {})
        sim_config = SimulatorConfig.model_validate({**config, "engine": EngineConfig(**engine)})
        runner, port = await start_server(sim_config, "127.0.0.1", 0)
        sim = Sim(name, f"http://127.0.0.1:{port}", runner)
        started.append(sim)
        return sim

    yield start
    for sim in started:
        await sim.runner.cleanup()


async def sim_metric(http: aiohttp.ClientSession, sim: Sim, name: str) -> float:
    async with http.get(sim.url + "/metrics") as resp:
        text = await resp.text()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name)


async def successes(http: aiohttp.ClientSession, sims: list[Sim]) -> list[float]:
    return [await sim_metric(http, s, "vllm:request_success_total") for s in sims]


def chat_body(system: str | None, text: str, model: str = MODEL, max_tokens: int = 2,
              stream: bool = False) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": text})
    return {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": stream}


async def chat(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with http.post(url + "/v1/chat/completions", json=body,
                         timeout=aiohttp.ClientTimeout(total=60)) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def clogged(sim: Sim, count: int) -> AsyncIterator[None]:
    """`count` long streams held open on `sim` directly (a queue and a full batch there);
    cancelled on exit, which frees the simulator's slots at once."""
    async def hold(http: aiohttp.ClientSession) -> None:
        async with http.post(sim.url + "/v1/chat/completions",
                             json=chat_body(None, "long story", max_tokens=4000, stream=True),
                             ) as resp:
            async for _ in resp.content:
                pass

    async with aiohttp.ClientSession() as http:
        tasks = [asyncio.create_task(hold(http)) for _ in range(count)]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def proxy_for(tmp_path: Path, backends: list[Sim], workers: int = 2,
                    **lb: Any) -> tuple[ProxyProcess, ProxyConfig]:
    config = proxy_config(
        backends, workers=workers,
        listen={"host": "127.0.0.1", "port": free_port(), "admin_port": free_port()},
        # The simulators share the test's event loop with the clogging streams: on a loaded
        # machine an answer can take past the default 30 s without anything being wrong.
        upstream={"connect_timeout_seconds": 10.0, "read_timeout_seconds": 120.0},
        load_balancing={"signals": {"interval_seconds": 0.3, "models_interval_seconds": 1.0,
                                    "timeout_seconds": 5.0, "max_age_seconds": 5.0}, **lb})
    proxy = await start_proxy(tmp_path / "proxy.yaml", config, tmp_path / "proxy.log")
    return proxy, config


def signals_of(stats: dict[str, Any], name: str) -> dict[str, Any]:
    """One backend's signals in the pod's /stats (the newest any worker holds)."""
    return (stats.get("backends", {}).get(name) or {}).get("signals") or {}


async def wait_signals(proxy: ProxyProcess, check: Callable[[Callable[[str], dict[str, Any]]],
                                                            bool], what: str) -> None:
    await proxy.wait_for(lambda stats: check(lambda name: signals_of(stats, name)), what)


async def proxy_metric(proxy: ProxyProcess, name: str, **labels: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(proxy.admin + "/metrics") as resp:
        text = await resp.text()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and labels.items() <= s.labels.items())


async def decisions(proxy: ProxyProcess, reason: str) -> float:
    return await proxy_metric(proxy, "gpuproxy_routing_decisions_total", reason=reason)


async def test_least_load_avoids_a_queue_and_falls_back_when_signals_go_stale(
        tmp_path: Path, sims: Callable[..., Any]) -> None:
    # One slot, slow decoding: 12 long streams make a queue of 11 there.
    busy = await sims("busy", engine={"max_num_seqs": 1, "decode_interval_seconds": 0.2})
    idle = await sims("idle")
    proxy, config = await proxy_for(tmp_path, [busy, idle], strategy="least_load")
    try:
        async with clogged(busy, 12), aiohttp.ClientSession() as http:
            await wait_signals(proxy, lambda sig: (sig("busy").get("waiting") or 0) >= 8
                               and sig("idle").get("fresh") is True, "busy's queue seen")
            # The pod's gauges: the same signal in each worker, so the max, not the sum.
            depth = await proxy_metric(proxy, "gpuproxy_backend_queue_depth", backend="busy")
            assert 8 <= depth <= 12
            assert await proxy_metric(proxy, "gpuproxy_backend_signals_age_seconds",
                                      backend="idle") < 30
            before = await successes(http, [busy, idle])
            # Sequential: a request sent to busy would wait behind 4000-token streams (60 s).
            for i in range(10):
                await chat(http, proxy.url, chat_body(None, f"question {i}"))
            after = await successes(http, [busy, idle])
            assert after[1] - before[1] == 10
            assert after[0] == before[0]
            assert await decisions(proxy, "signals") >= 10
        async with aiohttp.ClientSession() as http:
            # Metrics vanish (a path that 404s): the signals age out, connection counts rule.
            lb = config.load_balancing.model_copy(update={
                "signals": config.load_balancing.signals.model_copy(
                    update={"metrics_path": "/no-metrics-here", "max_age_seconds": 1.0})})
            write_config(tmp_path / "proxy.yaml",
                         config.model_copy(update={"load_balancing": lb}))
            await wait_signals(proxy, lambda sig: sig("busy").get("fresh") is False
                               and sig("idle").get("fresh") is False
                               and sig("busy").get("error") == "HTTP 404", "signals stale")
            before = await successes(http, [busy, idle])
            for i in range(20):
                await chat(http, proxy.url, chat_body(None, f"after {i}"))
            after = await successes(http, [busy, idle])
            # Equal connection counts: either of the two, busy included (all 20 on one side
            # has odds of 2 in a million).
            assert after[0] > before[0]
            assert after[1] > before[1]
            assert await decisions(proxy, "connections") >= 20
    finally:
        await proxy.stop()


async def test_prefix_affinity_keeps_a_prefix_on_one_backend_and_spills_when_loaded(
        tmp_path: Path, sims: Callable[..., Any]) -> None:
    backends = [await sims(f"gpu-{i}") for i in range(3)]
    proxy, _ = await proxy_for(tmp_path, backends, strategy="prefix_affinity")
    try:
        async with aiohttp.ClientSession() as http:
            await wait_signals(proxy, lambda sig: all(sig(b.name).get("fresh") for b in backends),
                               "first scrape")
            homes: dict[int, int] = {}
            for tenant in range(6):
                before = await successes(http, backends)
                for question in range(5):
                    await chat(http, proxy.url,
                               chat_body(SYSTEM.format(tenant), f"question {question}"))
                after = await successes(http, backends)
                got = [a - b for a, b in zip(after, before, strict=True)]
                assert sorted(got) == [0, 0, 5], f"tenant {tenant}: {got}"
                homes[tenant] = got.index(5)
            assert len(set(homes.values())) >= 2  # different prefixes spread
            hits = sum([await sim_metric(http, b, "vllm:prefix_cache_hits_total")
                        for b in backends])
            queries = sum([await sim_metric(http, b, "vllm:prefix_cache_queries_total")
                           for b in backends])
            assert hits / queries > 0.6  # 4 of each tenant's 5 prompts reuse the system part
            await wait_signals(proxy, lambda sig: any(
                (sig(b.name).get("prefix_cache_hit_rate") or 0) > 0.5 for b in backends),
                "hit rate in /stats")
            # Tenant 0's backend gets busy: its requests spill to the same runner-up.
            home = backends[homes[0]]
            # Over the cap: ceil(1.25 * 21 / 3) + 8 (the default slack) = 17.
            async with clogged(home, 20):
                await wait_signals(proxy, lambda sig: (sig(home.name).get("running") or 0)
                                   + (sig(home.name).get("waiting") or 0) >= 20, "home busy")
                before = await successes(http, backends)
                for question in range(3):
                    await chat(http, proxy.url, chat_body(SYSTEM.format(0), f"q{question}"))
                after = await successes(http, backends)
                got = [a - b for a, b in zip(after, before, strict=True)]
                assert got[homes[0]] == 0
                assert sorted(got) == [0, 0, 3], got
            assert await decisions(proxy, "spill") >= 3
    finally:
        await proxy.stop()


async def test_a_model_served_by_one_backend_only_goes_there(
        tmp_path: Path, sims: Callable[..., Any]) -> None:
    lora = await sims("with-lora", lora_adapters=("tenant-lora",))
    plain = [await sims("plain-1"), await sims("plain-2")]
    # One process: it scrapes for itself (no supervisor, no snapshot file).
    proxy, _ = await proxy_for(tmp_path, [lora, *plain], workers=1, strategy="round_robin",
                               signals={"enabled": True, "interval_seconds": 0.3,
                                        "models_interval_seconds": 1.0, "timeout_seconds": 5.0})
    try:
        async with aiohttp.ClientSession() as http:
            await wait_signals(proxy, lambda sig: "tenant-lora" in (sig("with-lora").get(
                "models") or []) and all(sig(p.name).get("models") for p in plain),
                "model lists scraped")
            before = await successes(http, [lora, *plain])
            for i in range(6):
                answer = await chat(http, proxy.url,
                                    chat_body(None, f"hi {i}", model="tenant-lora"))
                assert answer["model"] == "tenant-lora"
            for i in range(6):
                await chat(http, proxy.url, chat_body(None, f"base {i}"))
            after = await successes(http, [lora, *plain])
            got = [a - b for a, b in zip(after, before, strict=True)]
            assert got[0] >= 6
            assert sum(got) == 12
            assert got[1] > 0
            assert got[2] > 0  # the base model still goes everywhere
            status, stats = await proxy.get("/stats")
            assert status == 200
            assert json.dumps(stats).count("tenant-lora") >= 1
    finally:
        await proxy.stop()


def test_clock_is_shared_by_processes() -> None:
    """The snapshot's times are time.monotonic(): one clock for every process of the host."""
    assert time.get_clock_info("monotonic").implementation.startswith("clock_gettime")
