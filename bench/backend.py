"""A fast fixed-response HTTP/1.1 backend for the benchmarks, plus SSE streaming endpoints.

A raw asyncio protocol on uvloop: a few microseconds of CPU per request, so the backend's
cost is small and identical for every proxy under test. `/v1/chat/completions` answers as an
OpenAI server does (a chat completion with `usage`, or chunk events when `"stream": true`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import signal
import socket
from typing import cast
from urllib.parse import parse_qs, urlsplit

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is in the proxy extra
    uvloop = None  # type: ignore[assignment]

BODY = b'{"id":"bench","object":"chat.completion","choices":[{"index":0,"text":"ok"}]}'
FIXED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(BODY)).encode()
    + b"\r\n\r\n"
    + BODY
)
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
CHAT_PATH = b"/v1/chat/completions"
_STREAM_TRUE = re.compile(rb'"stream"\s*:\s*true')
CHAT_BODY = (
    b'{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,'
    b'"model":"bench-model","system_fingerprint":null,"choices":[{"index":0,'
    b'"message":{"role":"assistant","content":"ok"},"logprobs":null,"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}'
)
CHAT_FIXED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(CHAT_BODY)).encode()
    + b"\r\n\r\n"
    + CHAT_BODY
)
# Bodies are never larger than this in the benchmarks; a bigger one closes the connection.
MAX_BODY = 1 << 20


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _event(index: int) -> bytes:
    return b'data: {"choices":[{"index":0,"delta":{"content":"tok%d"}}]}\n\n' % index


_CHUNK_HEAD = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"bench-model","system_fingerprint":null,"choices":[{"index":0,'
)


def _chat_event(index: int, count: int) -> bytes:
    """One `chat.completion.chunk`; the last one has finish_reason and the `usage` object."""
    if index == count - 1:
        return (
            _CHUNK_HEAD + b'"delta":{},"logprobs":null,"finish_reason":"stop"}],'
            b'"usage":{"prompt_tokens":5,"completion_tokens":%d,"total_tokens":%d}}\n\n'
            % (count - 1, count + 4)
        )
    role = b'"role":"assistant",' if index == 0 else b""
    delta = b'"delta":{%s"content":"tok%d"},' % (role, index)
    return _CHUNK_HEAD + delta + b'"logprobs":null,"finish_reason":null}]}\n\n'


class BenchProtocol(asyncio.Protocol):
    """Answers pipelined keep-alive requests; a path with `sse` in it (`/v1/sse?n=N&delay_ms=D`),
    or a chat completion asking for `"stream": true`, streams N events."""

    def __init__(self, sse_default_n: int, sse_default_delay_ms: float) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.streaming: asyncio.Task[None] | None = None
        self.sse_n = sse_default_n
        self.sse_delay = sse_default_delay_ms

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, hence a cast, not a check.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.streaming is not None:
            self.streaming.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.streaming is None:
            self._drain()

    def _drain(self) -> None:
        transport = self.transport
        out: list[bytes] = []
        while transport is not None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = self.buf[:end]
            length = 0
            lower = head.lower()
            pos = lower.find(b"\r\ncontent-length:")
            if pos >= 0:
                stop = lower.find(b"\r\n", pos + 2)
                length = int(lower[pos + 17 : stop if stop >= 0 else None].strip())
            if length > MAX_BODY:
                transport.close()
                return
            total = end + 4 + length
            if len(self.buf) < total:
                break
            body = self.buf[end + 4 : total]
            self.buf = self.buf[total:]
            line_end = head.find(b"\r\n")
            target = head[: line_end if line_end >= 0 else None].split(b" ")[1]
            path = target.split(b"?", 1)[0]
            chat = path == CHAT_PATH
            if b"sse" in path or (chat and _STREAM_TRUE.search(body)):
                if out:
                    transport.write(b"".join(out))
                    out.clear()
                stream = self._stream(target, chat)
                self.streaming = asyncio.get_running_loop().create_task(stream)
                return
            out.append(CHAT_FIXED if chat else FIXED)
        if out and transport is not None:
            transport.write(b"".join(out))

    async def _stream(self, target: bytes, chat: bool) -> None:
        query = parse_qs(urlsplit(target.decode("latin-1")).query)
        count = max(2, int(query.get("n", [str(self.sse_n)])[0]))
        delay = float(query.get("delay_ms", [str(self.sse_delay)])[0]) / 1000.0
        try:
            # The first event goes out with the headers: time-to-first-byte measured through a
            # proxy is then the proxy's own added latency plus loopback.
            if self.transport is None:
                return
            first = _chat_event(0, count) if chat else _event(0)
            self.transport.write(SSE_HEAD + _chunk(first))
            for index in range(1, count):
                await asyncio.sleep(delay)
                if self.transport is None:
                    return
                event = _chat_event(index, count) if chat else _event(index)
                self.transport.write(_chunk(event))
            if self.transport is not None:
                self.transport.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        finally:
            self.streaming = None
        if self.buf and self.transport is not None:
            self._drain()


def listening_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


async def serve(host: str, port: int, sse_n: int, sse_delay_ms: float) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(
        lambda: BenchProtocol(sse_n, sse_delay_ms), sock=listening_socket(host, port)
    )
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18000)
    parser.add_argument("--sse-events", type=int, default=20, help="default events per stream")
    parser.add_argument("--sse-delay-ms", type=float, default=50.0, help="default gap per event")
    args = parser.parse_args(argv)
    if args.host != "127.0.0.1":
        parser.error("--host: the benchmark backend listens on 127.0.0.1 only")
    coro = serve(args.host, args.port, args.sse_events, args.sse_delay_ms)
    with contextlib.suppress(KeyboardInterrupt):
        if uvloop is not None:
            uvloop.run(coro)
        else:
            asyncio.run(coro)


if __name__ == "__main__":
    main()
