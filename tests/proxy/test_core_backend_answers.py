"""A backend's HTTP answers never eject it; a broken or ambiguous answer is a counted 502, and
hop-by-hop fields the backend names never reach the client (through the real request path)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import pytest
from prometheus_client import generate_latest
from tests.proxy.conftest import ProxyFactory, proxy_config
from tests.proxy.fakes import FakeBackend

from gpuproxy_proxy.appkeys import METRICS
from gpuproxy_proxy.runtime import RUNTIME


@contextlib.asynccontextmanager
async def raw_backend(answer: bytes) -> AsyncIterator[FakeBackend]:
    """A backend that reads one request head and sends exactly `answer`, then closes."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield FakeBackend("raw", port=port)
    finally:
        server.close()
        await server.wait_closed()


async def test_5xx_answers_keep_the_backend_in_rotation(backends: list[FakeBackend],
                                                        make_proxy: ProxyFactory) -> None:
    failing = await FakeBackend("failing", mode="fail").start()
    good = await FakeBackend("good").start()
    backends.extend([failing, good])
    # Any client can provoke a 500 (a bad prompt); it must not take the backend away.
    client = await make_proxy(proxy_config(backends))
    statuses = [(await client.post("/v1/chat/completions", json={})).status for _ in range(10)]
    assert sorted(statuses) == [200] * 5 + [500] * 5
    assert failing.hits == 5
    assert good.hits == 5
    runtime = client.app[RUNTIME]
    state = {b.name: b for b in runtime.pool.backends}
    assert state["failing"].consecutive_failures == 0
    assert not state["failing"].ejected_until


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nX-Bad: a\rb\r\nContent-Length: 2\r\n\r\nok",
])
async def test_an_ambiguous_answer_is_a_counted_502(answer: bytes,
                                                    make_proxy: ProxyFactory) -> None:
    async with raw_backend(answer) as backend:
        client = await make_proxy(proxy_config([backend]))
        resp = await client.post("/v1/chat/completions", json={})
        assert resp.status == 502
        error = (await resp.json())["error"]
        assert error["type"] == "upstream_error"
        assert error["request_id"] == resp.headers["X-Request-ID"]
        text = generate_latest(client.app[METRICS].registry).decode()
        assert 'gpuproxy_backend_failures_total{backend="raw",reason="protocol"} 1.0' in text
        assert 'gpuproxy_requests_failed_total{route="chat_completions"} 1.0' in text


async def test_a_bad_chunk_cuts_the_stream_and_is_counted(make_proxy: ProxyFactory) -> None:
    answer = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"5\r\nhello\r\n0x5\r\nworld\r\n0\r\n\r\n")
    async with raw_backend(answer) as backend:
        client = await make_proxy(proxy_config([backend]))
        resp = await client.post("/v1/chat/completions", json={})
        assert resp.status == 200  # the head is gone before the bad chunk arrives
        with pytest.raises(aiohttp.ClientError):
            await resp.read()  # so the client sees an incomplete body, never "world"
        text = generate_latest(client.app[METRICS].registry).decode()
        assert ('gpuproxy_backend_failures_total{backend="raw",reason="stream_protocol"} 1.0'
                in text)


async def test_fields_the_backend_names_in_connection_never_reach_the_client(
    make_proxy: ProxyFactory,
) -> None:
    answer = (b"HTTP/1.1 200 OK\r\nConnection: X-Secret\r\nX-Secret: 1\r\nX-Public: 2\r\n"
              b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
    async with raw_backend(answer) as backend:
        client = await make_proxy(proxy_config([backend]))
        resp = await client.post("/v1/chat/completions", json={})
        assert resp.status == 200
        assert "X-Secret" not in resp.headers
        assert resp.headers["X-Public"] == "2"
        assert await resp.read() == b"{}"
