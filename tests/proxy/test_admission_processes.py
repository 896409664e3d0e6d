"""Admission through a real proxy process (2 workers: the supervisor scrapes the engine, the
workers read its snapshot) in front of a simulated vLLM server whose queue is long: requests
wait in the proxy instead of piling onto the GPU, are shed with 503 and Retry-After past the
queue deadline, and flow again once the engine's queue drains."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from tests.proxy.conftest import proxy_config
from tests.proxy.fakes import free_port
from tests.proxy.procs import start_proxy
from tests.proxy.test_routing_engine import (  # noqa: F401 - `sims` is a fixture
    chat_body,
    clogged,
    proxy_metric,
    sims,
    wait_signals,
)


async def _post(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, str]]:
    async with http.post(url + "/v1/chat/completions", json=chat_body(None, "hi"),
                         timeout=aiohttp.ClientTimeout(total=120)) as resp:
        await resp.read()
        return resp.status, dict(resp.headers)


async def test_a_full_engine_queue_holds_requests_in_the_proxy_and_sheds_them(
        tmp_path: Path, sims: Callable[..., Any]) -> None:  # noqa: F811
    gpu = await sims("gpu", engine={"max_num_seqs": 1, "decode_interval_seconds": 0.2})
    config = proxy_config(
        [gpu], workers=2,
        listen={"host": "127.0.0.1", "port": free_port(), "admin_port": free_port()},
        load_balancing={"signals": {"enabled": True, "interval_seconds": 0.3,
                                    "timeout_seconds": 5.0, "max_age_seconds": 5.0}},
        admission={"enabled": True, "max_in_flight_per_backend": 64, "max_engine_queue": 2,
                   "queue_timeout_seconds": 1.0, "retry_after_seconds": 4})
    proxy = await start_proxy(tmp_path / "proxy.yaml", config, tmp_path / "proxy.log")
    try:
        async with aiohttp.ClientSession() as http:
            async with clogged(gpu, 8):
                await wait_signals(proxy, lambda sig: (sig("gpu").get("waiting") or 0) >= 3,
                                   "the engine's queue seen by the pod")
                answers = await asyncio.gather(*(_post(http, proxy.url) for _ in range(4)))
                # Every one waited in the proxy, none reached the GPU, all were shed in time.
                assert [status for status, _ in answers] == [503] * 4
                assert all(headers.get("Retry-After") == "4" for _, headers in answers)
                assert await proxy_metric(proxy, "gpuproxy_admission_rejections_total",
                                          reason="deadline_pool") == 4
            # The clog is gone: once the pod's signals say so, requests are admitted again.
            await wait_signals(proxy, lambda sig: (sig("gpu").get("waiting") or 0) == 0
                               and sig("gpu").get("fresh") is True, "the queue drained")
            status, _ = await _post(http, proxy.url)
            assert status == 200
    finally:
        await proxy.stop()
