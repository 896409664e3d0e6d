"""Reference only: a protocol-level reverse proxy (uvloop, no aiohttp on the hot path).

Shows what the splice design costs per request in Python: the request head is forwarded
with one write to a pooled keep-alive upstream connection, and response bytes go to the client
transport as they arrive, framed by Content-Length or chunk sizes, never re-encoded. No auth,
no limits; HTTP/1.1 keep-alive with Content-Length request bodies only. Not part of the product.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
from collections import deque
from typing import cast

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None  # type: ignore[assignment]

FORWARDED = b"\r\nX-Forwarded-For: 127.0.0.1\r\n\r\n"


def _header_int(lower_head: bytes, name: bytes) -> int | None:
    pos = lower_head.find(b"\r\n" + name + b":")
    if pos < 0:
        return None
    end = lower_head.find(b"\r\n", pos + 2)
    return int(lower_head[pos + len(name) + 3 : end if end >= 0 else None])


class Pool:
    """Idle upstream connections, most recently used first (warm in cache)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: deque[Upstream] = deque()

    async def send(self, client: Downstream, request: bytes) -> None:
        up = self.idle.pop() if self.idle else None
        if up is None:
            loop = asyncio.get_running_loop()
            _t, up = await loop.create_connection(lambda: Upstream(self), self.host, self.port)
        up.start(client, request)


class Upstream(asyncio.Protocol):
    __slots__ = (
        "buf",
        "chunked",
        "client",
        "final",
        "head_done",
        "line",
        "pool",
        "remaining",
        "skip",
        "transport",
    )

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.client: Downstream | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pool.idle:
            self.pool.idle.remove(self)
        if self.client is not None and self.client.transport is not None:
            self.client.transport.close()

    def start(self, client: Downstream, request: bytes) -> None:
        self.client, self.buf, self.head_done = client, b"", False
        self.chunked, self.remaining, self.skip, self.final, self.line = False, 0, 0, False, b""
        assert self.transport is not None
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None or client.transport is None:
            return
        if not self.head_done:
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lower = self.buf[:end].lower()
            self.head_done = True
            self.chunked = b"\r\ntransfer-encoding: chunked" in lower
            length = _header_int(lower, b"content-length")
            data, start = self.buf, end + 4
            self.buf = b""
            self.remaining = (length or 0) - (len(data) - start)
        else:
            start = 0
            self.remaining -= len(data)
        client.transport.write(data)  # bytes go through as they arrive, never re-framed
        done = self._chunks_done(data, start) if self.chunked else self.remaining <= 0
        if done:
            self.client = None
            self.pool.idle.append(self)
            client.response_done()

    def _chunks_done(self, data: bytes, pos: int) -> bool:
        while pos < len(data):
            if self.skip:
                step = min(self.skip, len(data) - pos)
                pos += step
                self.skip -= step
                if not self.skip and self.final:
                    return True
                continue
            newline = data.find(b"\n", pos)
            if newline < 0:
                self.line += data[pos:]
                return False
            size = int((self.line + data[pos:newline]).split(b";")[0].strip() or b"0", 16)
            self.line, pos = b"", newline + 1
            self.skip = size + 2  # chunk data plus its CRLF; the last chunk has only the CRLF
            self.final = size == 0
        return False


class Downstream(asyncio.Protocol):
    __slots__ = ("buf", "busy", "pool", "transport")

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.buf = b""
        self.busy = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._next()

    def response_done(self) -> None:
        self.busy = False
        if self.buf:
            self._next()

    def _next(self) -> None:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        length = _header_int(self.buf[:end].lower(), b"content-length") or 0
        total = end + 4 + length
        if len(self.buf) < total:
            return
        request = self.buf[:end] + FORWARDED + self.buf[end + 4 : total]
        self.buf = self.buf[total:]
        self.busy = True
        if self.pool.idle:  # the common case: no coroutine, no task
            self.pool.idle.pop().start(self, request)
        else:
            asyncio.get_running_loop().create_task(self.pool.send(self, request))


async def serve(port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(4096)
    pool = Pool("127.0.0.1", upstream_port)
    server = await loop.create_server(lambda: Downstream(pool), sock=sock)
    async with server:
        await stop.wait()


def run(port: int, upstream_port: int) -> None:
    coro = serve(port, upstream_port)
    if uvloop is not None:
        uvloop.run(coro)
    else:
        asyncio.run(coro)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    children = []
    for _ in range(args.workers - 1):
        pid = os.fork()
        if pid == 0:
            run(args.port, args.upstream_port)
            os._exit(0)
        children.append(pid)
    try:
        run(args.port, args.upstream_port)
    finally:
        for pid in children:
            os.kill(pid, signal.SIGTERM)
        for pid in children:
            os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
