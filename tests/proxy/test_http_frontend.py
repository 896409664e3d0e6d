"""The client port's HTTP/1.1 server (http/protocol.py) at the byte level: raw sockets on both
sides, so nothing normalizes what the proxy reads or writes."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from tests.proxy.conftest import ProxyFactory, proxy_config

from gpuproxy_proxy.http.frontend import Frontend

_DEADLINE = 30.0


@dataclass
class RawBackend:
    """A backend on asyncio streams: records each request's exact bytes, answers by path."""

    requests: list[tuple[bytes, bytes]] = field(default_factory=list)  # (head, body)
    streamed: int = 0  # body bytes of /v1/flood written so far (drain() returned)
    port: int = 0
    _server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def name(self) -> str:
        return "raw"

    async def start(self) -> RawBackend:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    def forwarded(self) -> list[tuple[bytes, bytes]]:
        return [r for r in self.requests if not r[0].startswith(b"GET /health ")]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length) if length else b""
                self.requests.append((head, body))
                path = head.split(b" ")[1]
                if path == b"/v1/flood":
                    await self._flood(writer)
                    return
                if path == b"/v1/hop":
                    payload = b'{"ok": true}'
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Connection: keep-alive, X-Up-Hop\r\nX-Up-Hop: secret\r\n"
                                 b"Keep-Alive: timeout=5\r\nX-Up-Kept: yes\r\n"
                                 b"Content-Length: " + str(len(payload)).encode() +
                                 b"\r\n\r\n" + payload)
                else:
                    payload = json.dumps({"path": path.decode()}).encode()
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: " + str(len(payload)).encode() +
                                 b"\r\n\r\n" + payload)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _flood(self, writer: asyncio.StreamWriter) -> None:
        """An endless event stream; each write waits until the socket takes it."""
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        event = b"data: " + b"x" * (64 * 1024 - 8) + b"\n\n"
        chunk = b"%x\r\n%b\r\n" % (len(event), event)
        while self.streamed < 1024 * 1024 * 1024:
            writer.write(chunk)
            await writer.drain()
            self.streamed += len(event)


@pytest.fixture
async def raw_backend() -> AsyncIterator[RawBackend]:
    backend = await RawBackend().start()
    yield backend
    await backend.stop()


async def _proxy(make_proxy: ProxyFactory, backend: RawBackend, **overrides: Any) -> int:
    client = await make_proxy(proxy_config([backend], **overrides))  # type: ignore[list-item]
    port = client.server.port
    assert isinstance(port, int)
    return port


def _frontend(client_server: Any) -> Frontend:
    # pytest imports conftest under its own name too: no isinstance check of the server.
    frontend = client_server.client_port.frontend
    assert isinstance(frontend, Frontend)
    return frontend


async def _exchange(port: int, data: bytes) -> bytes:
    """Send `data`, read until the proxy closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        return await asyncio.wait_for(reader.read(), timeout=_DEADLINE)
    finally:
        writer.close()


def _parse(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ")[1]), headers, body


def _error(answer: bytes, status: int) -> dict[str, Any]:
    got, headers, body = _parse(answer)
    assert got == status, answer
    error: dict[str, Any] = json.loads(body)["error"]
    assert error["request_id"]
    assert headers["x-request-id"] == error["request_id"]
    assert headers["connection"] == "close"
    return error


async def _until(check: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + _DEADLINE
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


POST = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"


@pytest.mark.parametrize("head", [
    POST + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    POST + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    POST + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    POST + b"X-Folded: a\r\n  b\r\nContent-Length: 2\r\n\r\n{}",
    POST + b"Transfer-Encoding: gzip\r\n\r\n",
    b"GARBAGE\r\n\r\n",
], ids=["cl-and-te", "duplicate-cl", "conflicting-cl", "obs-fold", "te-not-chunked", "garbage"])
async def test_ambiguous_or_malformed_requests_get_400(
    raw_backend: RawBackend, make_proxy: ProxyFactory, head: bytes
) -> None:
    port = await _proxy(make_proxy, raw_backend)
    error = _error(await _exchange(port, head), 400)
    assert error["type"] == "invalid_request_error"
    assert not raw_backend.forwarded()  # nothing of it reached the backend


async def test_header_size_limits_give_431(raw_backend: RawBackend,
                                           make_proxy: ProxyFactory) -> None:
    port = await _proxy(make_proxy, raw_backend)
    long_header = POST + b"X-Big: " + b"a" * 9000 + b"\r\nContent-Length: 0\r\n\r\n"
    assert _error(await _exchange(port, long_header), 431)["type"] == "request_too_large"
    many = POST + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n"
    assert "headers" in _error(await _exchange(port, many), 431)["message"]
    ok = POST + b"X-Big: " + b"a" * 8000 + b"\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    assert _parse(await _exchange(port, ok))[0] == 200


async def test_body_limit_gives_413_with_length_and_chunked(
    raw_backend: RawBackend, make_proxy: ProxyFactory
) -> None:
    port = await _proxy(make_proxy, raw_backend, limits={"max_body_bytes": 100})
    with_length = POST + b"Content-Length: 101\r\n\r\n" + b"x" * 101
    assert "maxBodyBytes (100 bytes)" in _error(await _exchange(port, with_length),
                                                413)["message"]
    chunked = (POST + b"Transfer-Encoding: chunked\r\n\r\n"
               + (b"40\r\n" + b"y" * 64 + b"\r\n") * 2 + b"0\r\n\r\n")
    assert _error(await _exchange(port, chunked), 413)["type"] == "request_too_large"
    assert not raw_backend.forwarded()


async def test_chunked_request_body_is_reframed_with_a_length(
    raw_backend: RawBackend, make_proxy: ProxyFactory
) -> None:
    port = await _proxy(make_proxy, raw_backend)
    body = b'{"prompt": "hi", "pad": "' + b"z" * 300 + b'"}'
    pieces = [body[:7], body[7:200], body[200:]]
    chunked = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    answer = await _exchange(port, POST + b"Transfer-Encoding: chunked\r\n"
                             b"Connection: close\r\n\r\n" + chunked)
    assert _parse(answer)[0] == 200
    [(head, got)] = raw_backend.forwarded()
    assert got == body
    assert f"Content-Length: {len(body)}\r\n".encode() in head
    assert b"transfer-encoding" not in head.lower()


async def test_hop_by_hop_headers_are_stripped_both_ways(
    raw_backend: RawBackend, make_proxy: ProxyFactory
) -> None:
    port = await _proxy(make_proxy, raw_backend)
    answer = await _exchange(port, b"POST /v1/hop HTTP/1.1\r\nHost: x\r\n"
                             b"Connection: close, X-Client-Hop\r\nX-Client-Hop: secret\r\n"
                             b"Keep-Alive: timeout=9\r\nTE: trailers\r\nX-Client-Kept: yes\r\n"
                             b"Content-Length: 2\r\n\r\n{}")
    status, headers, _ = _parse(answer)
    assert status == 200
    assert headers["x-up-kept"] == "yes"
    assert "x-up-hop" not in headers
    assert "keep-alive" not in headers
    assert headers["connection"] == "close"  # ours, for the client asked to close
    [(head, _)] = raw_backend.forwarded()
    lower = head.lower()
    assert b"x-client-kept: yes" in lower
    for name in (b"x-client-hop", b"keep-alive", b"te:", b"connection"):
        assert name not in lower, name


async def test_pipelined_requests_are_answered_in_order(
    raw_backend: RawBackend, make_proxy: ProxyFactory
) -> None:
    port = await _proxy(make_proxy, raw_backend)
    burst = (b"POST /v1/one HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
             b"GET /nope HTTP/1.1\r\nHost: x\r\nX-Request-ID: rid-2\r\n\r\n"
             b"POST /v1/three HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
             b"Content-Length: 2\r\n\r\n{}")
    answer = await _exchange(port, burst)
    parts = answer.split(b"HTTP/1.1 ")[1:]
    assert [p.split(b" ", 1)[0] for p in parts] == [b"200", b"404", b"200"]
    assert b'{"path": "/v1/one"}' in parts[0]
    assert b"X-Request-ID: rid-2" in parts[1]
    assert b'{"path": "/v1/three"}' in parts[2]


async def test_keepalive_timeout_closes_an_idle_connection(
    raw_backend: RawBackend, make_proxy: ProxyFactory
) -> None:
    port = await _proxy(make_proxy, raw_backend, limits={"keepalive_timeout_seconds": 0.3})
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(POST + b"Content-Length: 2\r\n\r\n{}")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=_DEADLINE)
        assert head.startswith(b"HTTP/1.1 200")
        assert b"connection: close" not in head.lower()
        idle_from = time.monotonic()
        rest = await asyncio.wait_for(reader.read(), timeout=_DEADLINE)  # until closed
        assert rest == b'{"path": "/v1/completions"}'
        assert time.monotonic() - idle_from >= 0.3
    finally:
        writer.close()


async def test_http10_without_keepalive_is_closed_after_the_answer(
    raw_backend: RawBackend, make_proxy: ProxyFactory
) -> None:
    port = await _proxy(make_proxy, raw_backend)
    answer = await _exchange(port, b"POST /v1/completions HTTP/1.0\r\nContent-Length: 2\r\n"
                             b"\r\n{}")  # read() returns only once the proxy closed
    status, headers, body = _parse(answer)
    assert (status, headers["connection"]) == (200, "close")
    assert body == b'{"path": "/v1/completions"}'


async def test_expect_100_continue(raw_backend: RawBackend, make_proxy: ProxyFactory) -> None:
    port = await _proxy(make_proxy, raw_backend, limits={"max_body_bytes": 100})
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(POST + b"Expect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=_DEADLINE)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"{}")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=_DEADLINE)
        assert head.startswith(b"HTTP/1.1 200")
    finally:
        writer.close()
    # Over the limit: refused before the body is asked for.
    answer = await _exchange(port, POST + b"Expect: 100-continue\r\nContent-Length: 500\r\n\r\n")
    assert not answer.startswith(b"HTTP/1.1 100")
    _error(answer, 413)


async def test_a_client_that_stops_reading_holds_back_the_stream(
    raw_backend: RawBackend, make_proxy: ProxyFactory
) -> None:
    client = await make_proxy(proxy_config([raw_backend]))  # type: ignore[list-item]
    frontend = _frontend(client.server)
    port = client.server.port
    assert isinstance(port, int)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /v1/flood HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=_DEADLINE)
        assert head.startswith(b"HTTP/1.1 200")
        # The client reads nothing more. The backend is held back once the buffers on the
        # way are full: its count stops growing, far below the gigabyte it would send.
        deadline = time.monotonic() + 60
        last, still_since = -1, time.monotonic()
        while time.monotonic() - still_since < 1.0:
            assert time.monotonic() < deadline, "the backend was never held back"
            if raw_backend.streamed != last:
                last, still_since = raw_backend.streamed, time.monotonic()
            await asyncio.sleep(0.05)
        assert raw_backend.streamed < 64 * 1024 * 1024
        [conn] = list(frontend._conns)
        assert conn.transport is not None
        assert conn.transport.get_write_buffer_size() <= 1024 * 1024
    finally:
        writer.close()


async def test_an_upgrade_offer_is_answered_in_http11_then_closed(
    raw_backend: RawBackend, make_proxy: ProxyFactory
) -> None:
    """What `curl --http2` sends to an http:// URL: the proxy switches no protocol."""
    port = await _proxy(make_proxy, raw_backend)
    answer = await _exchange(port, POST + b"Connection: Upgrade, HTTP2-Settings\r\n"
                             b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
                             b"Content-Length: 2\r\n\r\n{}")
    status, headers, body = _parse(answer)
    assert (status, headers["connection"]) == (200, "close")
    assert body == b'{"path": "/v1/completions"}'
    [(head, _)] = raw_backend.forwarded()
    assert b"upgrade" not in head.lower()


async def test_access_log_has_one_line_per_request(
    raw_backend: RawBackend, caplog: pytest.LogCaptureFixture
) -> None:
    from gpuproxy_proxy.config import Secrets
    from gpuproxy_proxy.process.server import Worker, reuseport_socket

    config = proxy_config([raw_backend], logging={"access_log": True})  # type: ignore[list-item]
    worker = Worker(config, Secrets())
    sock = reuseport_socket("127.0.0.1", 0, 128)
    await worker.start(sock)
    try:
        with caplog.at_level(logging.INFO, logger="gpuproxy.access"):
            answer = await _exchange(sock.getsockname()[1], POST + b"X-Request-ID: rid-log\r\n"
                                     b"Connection: close\r\nContent-Length: 2\r\n\r\n{}")
        assert _parse(answer)[0] == 200
        [line] = [r for r in caplog.records if r.name == "gpuproxy.access"]
        assert line.__dict__["request_id"] == "rid-log"
        assert (line.__dict__["status"], line.__dict__["path"]) == (200, "/v1/completions")
        assert line.__dict__["bytes_out"] == len(b'{"path": "/v1/completions"}')
    finally:
        await worker.drain()
