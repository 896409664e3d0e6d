"""The upstream client against a hostile or broken backend: a raw socket that sends exactly the
bytes under test. Ambiguous framing is an UpstreamProtocolError (a 502 for the client), and no
byte a backend sends beyond its response can become the next request's answer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence

import pytest

from gpuproxy_proxy.upstream.pool import (
    MAX_HEAD_BYTES,
    ResponseHead,
    UpstreamPools,
    UpstreamProtocolError,
)

GET = b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"
HEAD = b"HEAD /x HTTP/1.1\r\nHost: t\r\n\r\n"
FRESH = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh"
# (connection number, request number on that connection, request head) -> the writes to make.
Script = Callable[[int, int, bytes], Sequence[bytes]]


class RawBackend:
    """Reads each request head and answers with the scripted writes, byte for byte."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> RawBackend:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = self.connections
        try:
            number = 0
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                number += 1
                for data in self.script(conn, number, head):
                    writer.write(data)
                    await writer.drain()  # each write is its own send: splits are real
        except ConnectionError:
            return
        finally:
            writer.close()


@pytest.fixture
async def pools() -> AsyncIterator[UpstreamPools]:
    p = UpstreamPools(max_per_backend=8, connect_timeout=10.0, read_timeout=30.0)
    yield p
    await p.close()


@pytest.fixture
async def backends() -> AsyncIterator[list[RawBackend]]:
    started: list[RawBackend] = []
    yield started
    for backend in started:
        backend.stop()


async def _backend(backends: list[RawBackend], script: Script) -> RawBackend:
    backend = await RawBackend(script).start()
    backends.append(backend)
    return backend


def _first_then_fresh(*writes: bytes) -> Script:
    """The answer under test on the first connection, a well-formed one everywhere else."""
    def script(conn: int, number: int, _: bytes) -> Sequence[bytes]:
        return writes if conn == 1 and number == 1 else [FRESH]
    return script


async def _exchange(pools: UpstreamPools, backend: RawBackend,
                    request: bytes = GET) -> tuple[ResponseHead, bytes]:
    pool = pools.pool("127.0.0.1", backend.port, False)
    conn, head = await pools.exchange(pool, request, request.startswith(b"HEAD"))
    try:
        return head, await conn.read_all()
    finally:
        conn.release()


async def _refused_then_fresh(pools: UpstreamPools, backend: RawBackend) -> None:
    """The bad answer is a protocol error, its connection is gone, the next request is fine."""
    with pytest.raises(UpstreamProtocolError):
        await _exchange(pools, backend)
    pool = pools.pool("127.0.0.1", backend.port, False)
    assert pool.total == 0  # closed, not pooled
    head, body = await _exchange(pools, backend)
    assert (head.status, body) == (200, b"fresh")
    assert backend.connections == 2


@pytest.mark.parametrize("value", [
    b"+5", b"0_5", "\uff15".encode(),  # accepted by int() before
    b"5, 5", b"5 5", b"-5", b"", b"0x5", b"5" * 19,
])
async def test_non_canonical_content_length_is_a_protocol_error(
    pools: UpstreamPools, backends: list[RawBackend], value: bytes
) -> None:
    backend = await _backend(backends, _first_then_fresh(
        b"HTTP/1.1 200 OK\r\nContent-Length: " + value + b"\r\n\r\nhello"))
    await _refused_then_fresh(pools, backend)


@pytest.mark.parametrize("size_line", [
    b"+5", b"0x5", b"0_5", b" 5", b"5 ", b"-5", b"0" * 16 + b"5", b"5;a\rb",  # int(, 16) took
    b"", b"g",
])
async def test_non_canonical_chunk_size_is_a_protocol_error(
    pools: UpstreamPools, backends: list[RawBackend], size_line: bytes
) -> None:
    backend = await _backend(backends, _first_then_fresh(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        size_line + b"\r\nhello\r\n0\r\n\r\n"))
    await _refused_then_fresh(pools, backend)


@pytest.mark.parametrize("body", [
    b"5\r\nhelloXX0\r\n\r\n",  # two bytes where the CRLF after the data belongs
    b"5\nhello\r\n0\r\n\r\n",  # bare LF ending a chunk-size line
    b"5\r\nhello\r\n0\r\n\n",  # bare LF ending the trailer section
])
async def test_chunk_lines_and_chunk_data_end_with_crlf(
    pools: UpstreamPools, backends: list[RawBackend], body: bytes
) -> None:
    backend = await _backend(backends, _first_then_fresh(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", body))
    await _refused_then_fresh(pools, backend)


async def test_canonical_chunked_framing_still_passes(
    pools: UpstreamPools, backends: list[RawBackend]
) -> None:
    backend = await _backend(backends, _first_then_fresh(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"5 ;name=value\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n"))
    head, body = await _exchange(pools, backend)
    assert (head.status, body) == (200, b"hello0123456789")
    head, body = await _exchange(pools, backend)
    assert (head.status, body) == (200, b"fresh")
    assert backend.connections == 1  # reused: nothing was left over


async def test_head_size_limit_counts_the_whole_head(
    pools: UpstreamPools, backends: list[RawBackend]
) -> None:
    piece = MAX_HEAD_BYTES // 2 - 100
    # Three header lines, each a separate send well under the limit; together above it.
    writes = [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"]
    writes += [b"X-Big-%d: " % i + b"a" * piece + b"\r\n" for i in range(3)]
    writes.append(b"\r\nok")
    backend = await _backend(backends, _first_then_fresh(*writes))
    await _refused_then_fresh(pools, backend)


async def test_interim_heads_count_toward_the_head_size_limit(
    pools: UpstreamPools, backends: list[RawBackend]
) -> None:
    hint = b"HTTP/1.1 103 Early Hints\r\nLink: <" + b"a" * (MAX_HEAD_BYTES // 3) + b">\r\n\r\n"
    backend = await _backend(backends, _first_then_fresh(
        hint, hint, hint, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    await _refused_then_fresh(pools, backend)


@pytest.mark.parametrize("line", [
    b"X-A: a\rb", b"X-A: a\nb", b"X-A: a\x00b",  # a control byte inside a value
    b"Content-Length : 5", b"X A: 1", b"X-A\x01: 1",  # not a token before the colon
    b"X-A: a\r\n b",  # obs-fold
])
async def test_control_bytes_and_bad_field_names_are_a_protocol_error(
    pools: UpstreamPools, backends: list[RawBackend], line: bytes
) -> None:
    backend = await _backend(backends, _first_then_fresh(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n" + line + b"\r\n\r\nhello"))
    await _refused_then_fresh(pools, backend)


@pytest.mark.parametrize("status_line", [
    b"HTTP/1.1 +200 OK", b"HTTP/1.1 0200 OK", b"HTTP/1.12 200 OK", b"HTTP/1.1 099 Low",
    b"HTTP/2.0 200 OK", b"HTTP/1.1 20 OK",
])
async def test_bad_status_line_is_a_protocol_error(
    pools: UpstreamPools, backends: list[RawBackend], status_line: bytes
) -> None:
    backend = await _backend(backends, _first_then_fresh(
        status_line + b"\r\nContent-Length: 5\r\n\r\nhello"))
    await _refused_then_fresh(pools, backend)


@pytest.mark.parametrize("codings", [b"gzip, chunked", b"chunked, chunked", b"identity"])
async def test_transfer_codings_other_than_chunked_are_a_protocol_error(
    pools: UpstreamPools, backends: list[RawBackend], codings: bytes
) -> None:
    backend = await _backend(backends, _first_then_fresh(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + codings + b"\r\n\r\n",
        b"5\r\nhello\r\n0\r\n\r\n"))
    await _refused_then_fresh(pools, backend)


async def test_chunked_with_content_length_is_read_chunked_and_not_reused(
    pools: UpstreamPools, backends: list[RawBackend]
) -> None:
    backend = await _backend(backends, _first_then_fresh(
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"))
    head, body = await _exchange(pools, backend)
    assert (head.content_length, body) == (None, b"hello")
    await _exchange(pools, backend)
    assert backend.connections == 2


async def test_headers_named_by_connection_are_stripped(
    pools: UpstreamPools, backends: list[RawBackend]
) -> None:
    backend = await _backend(backends, _first_then_fresh(
        b"HTTP/1.1 200 OK\r\nConnection: X-Secret, keep-alive,X-Closer\r\nX-Secret: s\r\n"
        b"X-Closer: c\r\nx-secret: again\r\nX-Kept: k\r\nContent-Length: 2\r\n\r\nok"))
    head, body = await _exchange(pools, backend)
    names = [key.lower() for key, _ in head.headers]
    assert body == b"ok"
    assert "x-secret" not in names
    assert "x-closer" not in names
    assert "x-kept" in names
    await _exchange(pools, backend)
    assert backend.connections == 1  # a token containing "close" is not "close"


@pytest.mark.parametrize(("request_head", "answer"), [
    (HEAD, b"HTTP/1.1 200 OK\r\nContent-Length: 44\r\n\r\n"),
    (GET, b"HTTP/1.1 304 Not Modified\r\nContent-Length: 44\r\n\r\n"),
    (GET, b"HTTP/1.1 204 No Content\r\nContent-Length: 44\r\n\r\n"),
    (GET, b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n"),
])
async def test_bodiless_answer_announcing_a_body_is_not_reused(
    pools: UpstreamPools, backends: list[RawBackend], request_head: bytes, answer: bytes
) -> None:
    # The desynchronised backend sends the announced body late, when the next request comes
    # on the same connection; it looks like a whole response. No client may ever see it.
    stale = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale"

    def script(conn: int, number: int, _: bytes) -> Sequence[bytes]:
        if conn == 1:
            return [answer] if number == 1 else [stale, FRESH]
        return [FRESH]

    backend = await _backend(backends, script)
    head, body = await _exchange(pools, backend, request_head)
    assert body == b""
    head, body = await _exchange(pools, backend)
    assert (head.status, body) == (200, b"fresh")
    assert backend.connections == 2


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + FRESH,
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n" + FRESH,
    b"HTTP/1.1 204 No Content\r\n\r\n" + FRESH,
])
async def test_bytes_beyond_a_complete_response_close_the_connection(
    pools: UpstreamPools, backends: list[RawBackend], answer: bytes
) -> None:
    def script(conn: int, number: int, _: bytes) -> Sequence[bytes]:
        if conn == 1:
            return [answer] if number == 1 else [b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbad"]
        return [b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ngood"]

    backend = await _backend(backends, script)
    await _exchange(pools, backend)
    head, body = await _exchange(pools, backend)
    assert (head.status, body) == (200, b"good")
    assert backend.connections == 2
