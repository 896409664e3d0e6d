"""Every client-side wait has a deadline (issue 11, item 3, the HTTP part): a slow request head
or body gets a 408 and frees its in-flight slot; a client that stops reading is cut, with the
backend connection it held (never handed back to the pool)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import aiohttp
from tests.proxy.conftest import ProxyFactory, proxy_config
from tests.proxy.fakes import free_port
from tests.proxy.procs import start_proxy
from tests.proxy.test_http_frontend import POST, RawBackend, _error, _frontend, _until, raw_backend

from gpuproxy_proxy.appkeys import METRICS
from gpuproxy_proxy.runtime import RUNTIME
from gpuproxy_proxy.upstream.forward import UPSTREAM_POOLS

__all__ = ["raw_backend"]  # the fixture, imported for the tests here

# Generous: what must happen within a deadline of about a second, on a slow loaded machine.
_BOUND = 15.0


async def _client(make_proxy: ProxyFactory, backend: RawBackend, **limits: Any) -> Any:
    return await make_proxy(proxy_config([backend], limits=limits))  # type: ignore[list-item]


def _timeouts(client: Any, phase: str) -> float:
    value = client.app[METRICS].registry.get_sample_value("gpuproxy_client_timeouts_total",
                                                          {"phase": phase})
    return value or 0.0


async def _trickle_until_answered(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                                  piece: bytes, every: float) -> bytes:
    """Send `piece` every `every` seconds (the slow client) until the proxy answers and
    closes; the answer as read."""
    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            while True:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(every)

    sender = asyncio.create_task(trickle())
    try:
        return await asyncio.wait_for(reader.read(), timeout=_BOUND)
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender


async def test_a_head_sent_byte_by_byte_gets_408_at_the_head_deadline(
    raw_backend: RawBackend, make_proxy: ProxyFactory
) -> None:
    """Slowloris: the keep-alive timeout (75 s) no longer bounds a head under way."""
    client = await _client(make_proxy, raw_backend, request_head_timeout_seconds=1.0)
    port = client.server.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    try:
        writer.write(POST)
        answer = await _trickle_until_answered(reader, writer, b"X-Slow: 1\r\n", 0.1)
    finally:
        writer.close()
    elapsed = time.monotonic() - started
    error = _error(answer, 408)
    assert error["type"] == "request_timeout"
    assert "head" in error["message"]
    assert 1.0 <= elapsed < _BOUND
    assert _timeouts(client, "head") == 1.0
    assert raw_backend.forwarded() == []


async def test_a_body_slower_than_the_minimum_rate_gets_408_and_frees_its_slot(
    raw_backend: RawBackend, make_proxy: ProxyFactory
) -> None:
    client = await _client(make_proxy, raw_backend, body_min_bytes_per_second=1000,
                           body_min_rate_grace_seconds=1.0, body_read_timeout_seconds=60.0)
    runtime = client.app[RUNTIME]
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    started = time.monotonic()
    try:
        writer.write(POST + b"X-Request-ID: slow-body-1\r\nContent-Length: 100000\r\n\r\n")
        await _until(lambda: runtime.in_flight == 1, "the handler took its slot")
        answer = await _trickle_until_answered(reader, writer, b"x" * 10, 0.1)  # ~100 B/s
    finally:
        writer.close()
    elapsed = time.monotonic() - started
    error = _error(answer, 408)
    assert error["request_id"] == "slow-body-1"
    assert "slower than 1000 bytes/s" in error["message"]
    assert 1.0 <= elapsed < _BOUND  # ends after the grace period, far before the total
    await _until(lambda: runtime.in_flight == 0, "the in-flight slot was freed")
    assert _timeouts(client, "body") == 1.0
    assert raw_backend.forwarded() == []


async def test_a_body_past_the_total_time_gets_408_whatever_its_rate(
    raw_backend: RawBackend, make_proxy: ProxyFactory
) -> None:
    client = await _client(make_proxy, raw_backend, body_min_bytes_per_second=0,
                           body_read_timeout_seconds=1.0)
    runtime = client.app[RUNTIME]
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    started = time.monotonic()
    try:
        writer.write(POST + b"Transfer-Encoding: chunked\r\n\r\n")
        answer = await _trickle_until_answered(reader, writer, b"1\r\nx\r\n", 0.05)
    finally:
        writer.close()
    error = _error(answer, 408)
    assert "did not arrive within 1s" in error["message"]
    assert 1.0 <= time.monotonic() - started < _BOUND
    await _until(lambda: runtime.in_flight == 0, "the in-flight slot was freed")
    assert _timeouts(client, "body") == 1.0


async def test_a_body_never_sent_after_100_continue_gets_408(
    raw_backend: RawBackend, make_proxy: ProxyFactory
) -> None:
    client = await _client(make_proxy, raw_backend, body_read_timeout_seconds=1.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    try:
        writer.write(POST + b"Expect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), timeout=_BOUND)
    finally:
        writer.close()
    interim, _, final = answer.partition(b"\r\n\r\n")
    assert interim == b"HTTP/1.1 100 Continue"
    _error(final, 408)
    await _until(lambda: client.app[RUNTIME].in_flight == 0, "the in-flight slot was freed")


async def test_a_quick_body_in_pieces_is_not_cut(
    raw_backend: RawBackend, make_proxy: ProxyFactory
) -> None:
    client = await _client(make_proxy, raw_backend, body_min_bytes_per_second=20,
                           body_min_rate_grace_seconds=0.5, body_read_timeout_seconds=30.0,
                           request_head_timeout_seconds=3.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    try:
        writer.write(b"POST /v1/completions HTTP/1.1\r\n")
        await asyncio.sleep(0.2)  # a head in two reads, within its deadline
        writer.write(b"Host: x\r\nContent-Length: 400\r\n\r\n")
        for _ in range(8):  # 400 bytes in ~1.6 s: far above 20 B/s
            writer.write(b"x" * 50)
            await asyncio.sleep(0.2)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=_BOUND)
        assert head.startswith(b"HTTP/1.1 200"), head
    finally:
        writer.close()
    assert [len(body) for _, body in raw_backend.forwarded()] == [400]
    assert _timeouts(client, "head") == _timeouts(client, "body") == 0.0


async def test_a_client_that_stops_reading_is_cut_with_its_backend_connection(
    raw_backend: RawBackend, make_proxy: ProxyFactory
) -> None:
    client = await _client(make_proxy, raw_backend, client_write_timeout_seconds=1.0)
    frontend = _frontend(client.server)
    runtime = client.app[RUNTIME]
    pools = client.app[UPSTREAM_POOLS]
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    try:
        writer.write(b"POST /v1/flood HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=_BOUND)
        assert head.startswith(b"HTTP/1.1 200")
        # The client reads nothing more: once the buffers are full the proxy waits on it,
        # for the write deadline, then cuts both sides.
        await _until(lambda: not frontend._conns, "the client connection was aborted")
        await _until(lambda: runtime.in_flight == 0, "the handler ended")
        await _until(lambda: all(p.total == 0 for p in pools._pools.values()),
                     "the backend connection was closed, not pooled")
        assert _timeouts(client, "write") == 1.0
        streamed = raw_backend.streamed
        with contextlib.suppress(ConnectionError):
            while await asyncio.wait_for(reader.read(1 << 20), timeout=_BOUND):
                pass  # what was buffered, then the reset
        assert raw_backend.streamed - streamed < 16 * 1024 * 1024  # the backend stopped too
    finally:
        writer.close()


async def test_the_proxy_process_cuts_slow_bodies_and_clients_that_stop_reading(
    tmp_path: Path, raw_backend: RawBackend
) -> None:
    """The same on `gpuproxy-proxy --config` (uvloop's transports, the admin port's view)."""
    port, admin = free_port(), free_port()
    config = proxy_config([raw_backend], workers=1,  # type: ignore[list-item]
                          listen={"host": "127.0.0.1", "port": port, "admin_port": admin},
                          limits={"body_read_timeout_seconds": 1.0,
                                  "client_write_timeout_seconds": 1.0})
    proxy = await start_proxy(tmp_path / "proxy.yaml", config, tmp_path / "proxy.log")
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(POST + b"Content-Length: 1000\r\n\r\n{")  # and nothing more
            _error(await asyncio.wait_for(reader.read(), timeout=_BOUND), 408)
        finally:
            writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"POST /v1/flood HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=_BOUND)
            assert head.startswith(b"HTTP/1.1 200")
            await proxy.wait_for(lambda s: s["connections_active"] == 0
                                 and s["requests_in_flight"] == 0,
                                 "the client that stopped reading was cut")
        finally:
            writer.close()
        async with aiohttp.ClientSession() as http, http.get(proxy.admin + "/metrics") as resp:
            text = await resp.text()
        assert 'gpuproxy_client_timeouts_total{phase="body"} 1.0' in text
        assert 'gpuproxy_client_timeouts_total{phase="write"} 1.0' in text
        log = (tmp_path / "proxy.log").read_text()
        assert "client stopped reading" in log
        assert "client request timed out" in log
    finally:
        await proxy.stop()


async def test_a_slow_head_after_a_pipelined_request_gets_408_after_its_answer(
    raw_backend: RawBackend, make_proxy: ProxyFactory
) -> None:
    client = await _client(make_proxy, raw_backend, request_head_timeout_seconds=1.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    try:
        writer.write(POST + b"Content-Length: 2\r\n\r\n{}" + POST)
        answer = await _trickle_until_answered(reader, writer, b"X-Slow: 1\r\n", 0.1)
    finally:
        writer.close()
    first, sep, rest = answer.partition(b'{"path": "/v1/completions"}')
    assert sep, answer
    assert first.startswith(b"HTTP/1.1 200")
    _error(rest, 408)
    assert _timeouts(client, "head") == 1.0


async def test_a_reload_applies_the_new_deadlines_to_every_wheel(
    raw_backend: RawBackend, make_proxy: ProxyFactory
) -> None:
    client = await _client(make_proxy, raw_backend)
    frontend = _frontend(client.server)
    limits = client.app[RUNTIME].config.limits.model_copy(update={
        "request_head_timeout_seconds": 3.0, "body_min_bytes_per_second": 0,
        "body_read_timeout_seconds": 7.0, "client_write_timeout_seconds": 11.0})
    frontend.apply_limits(limits)
    deadlines = frontend.deadlines
    assert (deadlines.head.timeout, deadlines.body.timeout, deadlines.write.timeout) == (
        3.0, 7.0, 11.0)
