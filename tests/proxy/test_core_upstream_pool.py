"""The forward path's pooled HTTP/1.1 client against small raw asyncio servers on loopback:
framing variants, pool reuse, stale-connection retry, backpressure, timeouts, aborts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from gpuproxy_proxy.upstream.pool import (
    HIGH_WATER,
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamPools,
    UpstreamProtocolError,
    UpstreamReadTimeout,
)

Reply = Callable[[bytes, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]
REQUEST = b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"


class RawServer:
    """Answers each request on a connection with `reply`; counts connections and requests."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed = asyncio.Event()
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.requests.append(head)
                if not await self.reply(head, reader, writer):
                    return
        finally:
            self.closed.set()
            writer.close()


async def _answer(writer: asyncio.StreamWriter, data: bytes) -> bool:
    writer.write(data)
    await writer.drain()
    return True


@pytest.fixture
async def pools() -> AsyncIterator[UpstreamPools]:
    # Generous: a loaded machine must not turn a slow answer into a read timeout. The test of
    # the read timeout makes its own pools with a short one.
    p = UpstreamPools(max_per_backend=8, connect_timeout=10.0, read_timeout=30.0)
    yield p
    await p.close()


@pytest.fixture
async def servers() -> AsyncIterator[list[RawServer]]:
    started: list[RawServer] = []
    yield started
    for server in started:
        await server.stop()


async def _server(servers: list[RawServer], reply: Reply) -> RawServer:
    server = await RawServer(reply).start()
    servers.append(server)
    return server


async def _get(pools: UpstreamPools, server: RawServer, request: bytes = REQUEST,
               is_head: bool = False) -> tuple[int, bytes]:
    pool = pools.pool("127.0.0.1", server.port, False)
    conn, head = await pools.exchange(pool, request, is_head)
    try:
        return head.status, await conn.read_all()
    finally:
        conn.release()


async def test_content_length_response_reuses_the_connection(
    pools: UpstreamPools, servers: list[RawServer]
) -> None:
    async def reply(_: bytes, __: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        return await _answer(w, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello")

    server = await _server(servers, reply)
    for _ in range(3):
        assert await _get(pools, server) == (200, b"hello")
    assert server.connections == 1
    assert len(server.requests) == 3


async def test_chunked_response_is_decoded_across_odd_splits(
    pools: UpstreamPools, servers: list[RawServer]
) -> None:
    wire = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;ext=1\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n")

    async def reply(_: bytes, __: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        for i in range(len(wire)):  # one byte at a time: every boundary is a split
            w.write(wire[i:i + 1])
            await w.drain()
        return True

    server = await _server(servers, reply)
    assert await _get(pools, server) == (200, b"hello 0123456789")
    assert await _get(pools, server) == (200, b"hello 0123456789")
    assert server.connections == 1


async def test_http10_body_until_close_is_not_reused(
    pools: UpstreamPools, servers: list[RawServer]
) -> None:
    async def reply(_: bytes, __: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        await _answer(w, b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close")
        return False  # closing the connection ends the body

    server = await _server(servers, reply)
    assert await _get(pools, server) == (200, b"until close")
    assert await _get(pools, server) == (200, b"until close")
    assert server.connections == 2


async def test_connection_close_header_is_honoured(
    pools: UpstreamPools, servers: list[RawServer]
) -> None:
    async def reply(_: bytes, __: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        return await _answer(w, b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n"
                                b"\r\nok")

    server = await _server(servers, reply)
    assert await _get(pools, server) == (200, b"ok")
    assert await _get(pools, server) == (200, b"ok")
    assert server.connections == 2


async def test_1xx_is_skipped_and_bodiless_answers_keep_the_connection(
    pools: UpstreamPools, servers: list[RawServer]
) -> None:
    async def reply(head: bytes, _: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        # Heads that announce no body (a HEAD or 304 answer announcing one is not reused:
        # see test_upstream_strict_framing.py).
        if head.startswith(b"HEAD"):
            return await _answer(w, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        if b"/nocontent" in head:
            return await _answer(w, b"HTTP/1.1 204 No Content\r\n\r\n")
        if b"/notmodified" in head:
            return await _answer(w, b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n")
        return await _answer(w, b"HTTP/1.1 100 Continue\r\n\r\n"
                                b"HTTP/1.1 201 Created\r\nContent-Length: 3\r\n\r\nnew")

    server = await _server(servers, reply)
    assert await _get(pools, server) == (201, b"new")
    assert await _get(pools, server, b"HEAD /x HTTP/1.1\r\nHost: t\r\n\r\n", True) == (200, b"")
    assert await _get(pools, server, b"GET /nocontent HTTP/1.1\r\n\r\n") == (204, b"")
    assert await _get(pools, server, b"GET /notmodified HTTP/1.1\r\n\r\n") == (304, b"")
    assert await _get(pools, server) == (201, b"new")
    assert server.connections == 1


async def test_stale_pooled_connection_is_retried_once_on_a_fresh_one(
    pools: UpstreamPools, servers: list[RawServer]
) -> None:
    async def reply(_: bytes, __: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        await _answer(w, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return False  # keep-alive promised, then closed while idle

    server = await _server(servers, reply)
    assert await _get(pools, server) == (200, b"ok")
    await server.closed.wait()
    assert await _get(pools, server) == (200, b"ok")
    assert server.connections == 2


async def test_reused_connection_closed_before_answering_is_retried(
    pools: UpstreamPools, servers: list[RawServer]
) -> None:
    answered: list[asyncio.StreamWriter] = []  # strong refs: ids of dead writers get reused

    async def reply(_: bytes, __: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        if any(seen is w for seen in answered):
            return False  # the race a keep-alive timeout causes: request in, connection gone
        answered.append(w)
        return await _answer(w, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    server = await _server(servers, reply)
    assert await _get(pools, server) == (200, b"ok")
    assert await _get(pools, server) == (200, b"ok")
    assert server.connections == 2
    assert len(server.requests) == 3  # sent twice: once on the stale, once on a fresh one


async def test_backend_closing_mid_response_is_an_error(
    pools: UpstreamPools, servers: list[RawServer]
) -> None:
    async def reply(_: bytes, __: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        await _answer(w, b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        return False

    server = await _server(servers, reply)
    with pytest.raises(UpstreamDisconnected):
        await _get(pools, server)


async def test_garbage_response_is_a_protocol_error(
    pools: UpstreamPools, servers: list[RawServer]
) -> None:
    async def reply(_: bytes, __: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        return await _answer(w, b"SSH-2.0-OpenSSH\r\n\r\n")

    server = await _server(servers, reply)
    with pytest.raises(UpstreamProtocolError):
        await _get(pools, server)


async def test_silent_backend_hits_the_read_timeout(servers: list[RawServer]) -> None:
    async def reply(_: bytes, reader: asyncio.StreamReader, __: asyncio.StreamWriter) -> bool:
        await reader.read()  # never answers; returns when the client gives up
        return False

    server = await _server(servers, reply)
    pools = UpstreamPools(max_per_backend=8, connect_timeout=10.0, read_timeout=0.3)
    try:
        with pytest.raises(UpstreamReadTimeout):
            await _get(pools, server)
        await server.closed.wait()  # the timed-out connection was closed, not pooled
    finally:
        await pools.close()


async def test_refused_connection_is_a_connect_error(pools: UpstreamPools,
                                                     servers: list[RawServer]) -> None:
    async def reply(_: bytes, __: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        return False

    server = await _server(servers, reply)
    await server.stop()
    with pytest.raises(UpstreamConnectError):
        await _get(pools, server)


async def test_slow_reader_pauses_the_backend_and_gets_every_byte(
    pools: UpstreamPools, servers: list[RawServer]
) -> None:
    size = 16 * HIGH_WATER
    body = bytes(range(256)) * (size // 256)

    async def reply(_: bytes, __: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        return await _answer(w, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + body)

    server = await _server(servers, reply)
    pool = pools.pool("127.0.0.1", server.port, False)
    conn, head = await pools.exchange(pool, REQUEST, False)
    assert head.content_length == size
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while not conn._paused:  # let the backend fill our buffer while nobody reads
        assert loop.time() < deadline, "reading from the backend was never paused"
        await asyncio.sleep(0.001)
    assert conn._paused
    assert conn._buffered < 2 * HIGH_WATER  # bounded: not the whole body
    received = bytearray()
    while chunk := await conn.read():
        received += chunk
    conn.release()
    assert bytes(received) == body
    assert await _get(pools, server) == (200, body)
    assert server.connections == 1


async def test_pool_bound_makes_requests_wait_for_a_connection(servers: list[RawServer]) -> None:
    async def reply(_: bytes, __: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        return await _answer(w, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    server = await _server(servers, reply)
    pools = UpstreamPools(max_per_backend=1, connect_timeout=10.0, read_timeout=30.0)
    try:
        pool = pools.pool("127.0.0.1", server.port, False)
        first, _ = await pools.exchange(pool, REQUEST, False)
        waiting = asyncio.ensure_future(pools.exchange(pool, REQUEST, False))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not waiting.done()  # the only connection is busy
        assert await first.read_all() == b"ok"
        first.release()
        second, head = await waiting
        assert (head.status, await second.read_all()) == (200, b"ok")
        assert second is first
        second.release()
        assert server.connections == 1
    finally:
        await pools.close()


async def test_abort_closes_the_backend_connection(
    pools: UpstreamPools, servers: list[RawServer]
) -> None:
    async def reply(_: bytes, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\ntoken\r\n")
        await w.drain()
        await reader.read()  # the stream would go on; returns once the proxy hangs up
        return False

    server = await _server(servers, reply)
    pool = pools.pool("127.0.0.1", server.port, False)
    conn, _ = await pools.exchange(pool, REQUEST, False)
    assert await conn.read() == b"token"
    conn.abort()  # what a client disconnect does
    await server.closed.wait()
    assert pool.total == 0
