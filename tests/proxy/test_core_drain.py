"""SIGTERM drain of real two-worker proxies: not ready at once, served with `Connection: close`
during the drain delay, listener closed after it, idle connections closed one by one, streams in
flight all complete; a scale-down of 2 of 4 proxies under streaming load drops no stream; and
upstream.max_request_seconds ends what runs longer."""

from __future__ import annotations

import asyncio
import importlib.util
import signal
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
from tests.proxy.conftest import ProxyFactory, proxy_config
from tests.proxy.fakes import FakeBackend, free_port
from tests.proxy.procs import RawConnection, start_proxy

REPO = Path(__file__).resolve().parents[2]
CHAT = "/v1/chat/completions"


def _bench() -> ModuleType:
    """bench/drain_scale_down.py: the test runs the very scenario the benchmark reports."""
    spec = importlib.util.spec_from_file_location(
        "drain_scale_down", REPO / "bench" / "drain_scale_down.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


async def test_sigterm_drain_phases(tmp_path: Path, backends: list[FakeBackend]) -> None:
    backends.append(await FakeBackend("slow", chunks=60, delay=0.25).start())  # ~15 s streams
    # The delay covers seeing /ready turn 503 and one more request on a loaded machine.
    delay, idle_close = 5.0, 2.0
    port, admin = free_port(), free_port()
    config = proxy_config(backends, workers=2,
                          listen={"host": "127.0.0.1", "port": port, "admin_port": admin},
                          limits={"drain_delay_seconds": delay, "idle_close_seconds": idle_close,
                                  "shutdown_grace_seconds": 120})
    proxy = await start_proxy(tmp_path / "proxy.yaml", config, tmp_path / "proxy.log")
    idle: list[RawConnection] = []
    try:
        async with aiohttp.ClientSession() as http:
            streams = [await http.post(proxy.url + CHAT, json={"stream": True})
                       for _ in range(4)]
            for resp in streams:
                assert (await resp.content.readline()).startswith(b"data: ")
            for _ in range(12):  # kept alive, idle after one request
                conn = await RawConnection.open("127.0.0.1", port)
                assert (await conn.request("POST", CHAT, b"{}")).status == 200
                idle.append(conn)
            sigterm = time.monotonic()
            proxy.proc.send_signal(signal.SIGTERM)
            closed = [asyncio.create_task(c.wait_closed_by_server(120)) for c in idle]
            await proxy.wait_not_ready()
            # During the drain delay: still served, and told to reconnect elsewhere.
            async with http.post(proxy.url + CHAT, json={},
                                 headers={"Connection": "keep-alive"}) as late:
                assert late.status == 200
                assert late.headers["Connection"] == "close"
            # Then new connections are refused, while the streams are still running.
            while True:
                try:
                    probe = await RawConnection.open("127.0.0.1", port)
                except OSError:
                    break
                try:
                    await probe.request("POST", CHAT, b"{}", {"Connection": "close"})
                finally:
                    probe.close()
                assert time.monotonic() - sigterm < 60, "the listener was never closed"
                await asyncio.sleep(0.05)
            refused_after = time.monotonic() - sigterm
            assert refused_after >= delay * 0.9
            assert not any(resp.content.at_eof() for resp in streams)
            # Idle connections went one by one after the delay, not in one instant.
            waited = await asyncio.gather(*closed)
            moments = sorted(sigterm + w for w in waited)
            assert moments[0] - sigterm >= delay * 0.9
            assert moments[-1] - moments[0] >= idle_close / 2, moments
            burst = max(sum(1 for m in moments if t <= m < t + 0.05) for t in moments)
            assert burst < len(moments) / 2, moments
            for resp in streams:  # the streams that were running all complete
                rest = await resp.read()
                assert rest.rstrip().endswith(b"data: [DONE]")
                assert rest.count(b"data: ") == 61  # t1..t59, usage, [DONE]
        assert await asyncio.wait_for(proxy.proc.wait(), timeout=120) == 0
    finally:
        for conn in idle:
            conn.close()
        await proxy.stop()


async def test_scale_down_of_two_of_four_proxies_drops_no_stream(tmp_path: Path) -> None:
    bench = _bench()
    result = await bench.run(bench.Scenario(clients=16, warmup_seconds=3.0), tmp_path)
    assert result.in_flight_on_terminated_at_sigterm > 0  # the drain had streams to keep
    assert result.terminated_exit_codes == [0, 0]
    assert result.streams_truncated == 0, result.truncated_examples
    assert result.no_answer_after_retry == 0
    assert result.streams_completed > 16


async def test_scale_down_with_too_short_a_grace_is_counted(tmp_path: Path) -> None:
    """The same measurement sees cut streams when the grace is shorter than the streams."""
    bench = _bench()
    result = await bench.run(bench.Scenario(
        clients=16, warmup_seconds=3.0, events=20, event_gap_ms=200.0,  # 4 s streams
        drain_delay_seconds=0.0, grace_seconds=1.0), tmp_path)
    assert result.in_flight_on_terminated_at_sigterm > 0
    assert result.streams_truncated > 0


async def test_request_longer_than_max_request_seconds_gets_504(
    backends: list[FakeBackend], make_proxy: ProxyFactory
) -> None:
    slow = await FakeBackend("slow", mode="hang").start()
    backends.append(slow)
    client = await make_proxy(proxy_config(backends, upstream={"max_request_seconds": 0.5}))
    started = time.monotonic()
    resp = await client.post(CHAT, json={})
    assert resp.status == 504
    body: dict[str, Any] = await resp.json()
    assert body["error"]["type"] == "request_timeout"
    assert "max_request_seconds" in body["error"]["message"]
    assert time.monotonic() - started < 30
    await _until(lambda: slow.cancelled == 1, "the upstream request was not closed")


async def test_stream_longer_than_max_request_seconds_ends_with_an_sse_error(
    backends: list[FakeBackend], make_proxy: ProxyFactory
) -> None:
    backends.append(await FakeBackend("long", chunks=100, delay=0.1).start())
    client = await make_proxy(proxy_config(backends, upstream={"max_request_seconds": 1.0}))
    resp = await client.post(CHAT, json={"stream": True})
    assert resp.status == 200
    body = await resp.read()  # a complete chunked body: the stream was ended, not cut
    events = body.strip().split(b"\n\n")
    assert events[-1].startswith(b"event: error\ndata: ")
    assert b"request_timeout" in events[-1]
    assert 1 < len(events) < 100


async def _until(check: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)
