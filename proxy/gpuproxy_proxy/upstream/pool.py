"""A lean HTTP/1.1 client for the forward path: pooled keep-alive `asyncio.Protocol` connections.

aiohttp's ClientSession cost ~84 us of CPU per forwarded request (bench/README.md); this client
writes the request head in one write, parses the response head once and hands body bytes to the
caller as they arrive, with read timeouts checked by one periodic sweep instead of a timer each.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from typing import ClassVar, cast

from gpuproxy_proxy.upstream.framing import (
    CHUNKED,
    LENGTH,
    NONE,
    UNTIL_CLOSE,
    ResponseHead,
    chunk_size_of,
    parse_response_head,
)

# Response heads bigger than this are refused, counting every byte of the head (interim 1xx
# heads included): a backend may be compromised or broken, and buffering must stay bounded.
MAX_HEAD_BYTES = 64 * 1024
# A chunk-size line (size and extensions) or a trailer line longer than this is refused.
MAX_CHUNK_LINE = 4096
# Above this many unread body bytes the upstream socket is paused until the caller catches up:
# the caller awaits the client's drain, so a slow client slows the backend, not our memory.
HIGH_WATER = 256 * 1024
# Idle pooled connections older than this are closed (backends drop them around 60-75 s).
IDLE_KEEP_SECONDS = 55.0

_IDLE, _HEAD, _BODY, _DONE = 0, 1, 2, 3


class UpstreamError(Exception):
    """Base of the errors below; `reason` is their label on gpuproxy_backend_failures_total."""

    reason: ClassVar[str] = "error"


class UpstreamConnectError(UpstreamError):
    """The connection could not be opened: nothing reached the backend."""

    reason = "connect"


class UpstreamConnectTimeout(UpstreamConnectError, TimeoutError):
    """Opening the connection (or waiting for a free pool slot) timed out."""

    reason = "connect_timeout"


class UpstreamReadTimeout(UpstreamError, TimeoutError):
    """The backend sent nothing for `read_timeout` seconds."""

    reason = "read_timeout"


class UpstreamDisconnected(UpstreamError):
    """The backend closed the connection before the response was complete."""

    reason = "disconnected"


class UpstreamProtocolError(UpstreamError):
    """The backend's response is not valid, unambiguous HTTP/1.x (RFC 9110/9112 framing)."""

    reason = "protocol"


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection; serves one request at a time."""

    __slots__ = (
        "_body", "_buf", "_buffered", "_chunk_left", "_chunk_line", "_chunk_trailer",
        "_error", "_gone", "_head_bytes", "_head_waiter", "_is_head", "_length_left", "_mode",
        "_paused", "_reusable", "_state", "_waiter", "closed", "got_bytes", "head", "idle_since",
        "last_io", "loop", "pool", "transport",
    )

    def __init__(self, pool: HostPool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._gone = False
        self._state = _IDLE
        self._buf = b""
        self._head_bytes = 0  # of the interim (1xx) heads already parsed for this request
        self._body: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._error: BaseException | None = None
        self._head_waiter: asyncio.Future[ResponseHead] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._mode = NONE
        self._length_left = 0
        self._chunk_left = 0
        self._chunk_line = b""
        self._chunk_trailer = False
        self._reusable = False
        self._is_head = False
        self.head: ResponseHead | None = None
        self.got_bytes = False
        self.idle_since = 0.0
        self.last_io = 0.0

    # --- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        state = self._state
        if state == _BODY and self._mode == UNTIL_CLOSE and exc is None:
            self._finish(reusable=False)
        elif state in (_HEAD, _BODY):
            self._fail(UpstreamDisconnected(
                "backend closed the connection" + (" mid-response" if self.got_bytes else "")
            ))
        self._leave_pool()

    def eof_received(self) -> bool:
        return False  # close; connection_lost decides whether the response was complete

    def pause_writing(self) -> None:
        pass  # request bodies are bounded by limits.max_body_bytes and written at once

    def resume_writing(self) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        self.last_io = self.loop.time()
        self.got_bytes = True
        state = self._state
        if state == _BODY:
            self._feed_body(data)
        elif state == _HEAD:
            self._feed_head(data)
        else:
            # Bytes while idle (or after the response): the connection is unusable.
            self._reusable = False
            self.abort()

    # --- request side --------------------------------------------------------------------
    def send(self, request: bytes, is_head: bool) -> asyncio.Future[ResponseHead]:
        """Write the whole request; the future resolves with the response head."""
        self._state = _HEAD
        self._buf = b""
        self._head_bytes = 0
        self._body = []
        self._buffered = 0
        self._error = None
        self._is_head = is_head
        self.head = None
        self.got_bytes = False
        self.last_io = self.loop.time()
        waiter: asyncio.Future[ResponseHead] = self.loop.create_future()
        self._head_waiter = waiter
        assert self.transport is not None
        self.transport.write(request)
        return waiter

    async def read(self) -> bytes:
        """The next body bytes as they arrived (all buffered ones at once); b"" at the end."""
        while True:
            body = self._body
            if body:
                data = body[0] if len(body) == 1 else b"".join(body)
                self._body = []
                self._buffered = 0
                if self._paused and not self.closed and self.transport is not None:
                    self._paused = False
                    self.last_io = self.loop.time()
                    self.transport.resume_reading()
                return data
            if self._error is not None:
                raise self._error
            if self._state == _DONE:
                return b""
            waiter = self._waiter = self.loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    async def read_all(self) -> bytes:
        parts = []
        while chunk := await self.read():
            parts.append(chunk)
        return b"".join(parts)

    def release(self) -> None:
        """Done with this response: back to the pool if it was read whole, else closed."""
        if self._state == _DONE and self._reusable and not self.closed and not self._body:
            self._state = _IDLE
            self.pool.put_idle(self)
        else:
            self.abort()

    def abort(self) -> None:
        """Drop the connection at once (client gone, broken response): the backend sees it."""
        self._reusable = False
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()
        self._leave_pool()

    def _leave_pool(self) -> None:
        if not self._gone:
            self._gone = True
            self.pool.forget(self)

    def timed_out(self) -> None:
        self._fail(UpstreamReadTimeout("backend sent nothing within the read timeout"))
        self.abort()

    def waiting_for_backend(self) -> bool:
        """True when the response is incomplete and the caller is not the one holding it up."""
        return self._state in (_HEAD, _BODY) and not self._paused

    # --- response parsing ----------------------------------------------------------------
    def _feed_head(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) + self._head_bytes > MAX_HEAD_BYTES:
                    self._protocol_error("response head too large")
                    return
                self._buf = buf
                return
            size = end + 4
            if size + self._head_bytes > MAX_HEAD_BYTES:
                self._protocol_error("response head too large")
                return
            try:
                framed = parse_response_head(buf[:end], self._is_head)
            except (ValueError, UnicodeDecodeError) as exc:
                self._protocol_error(f"bad response head: {exc}")
                return
            head, keep_alive = framed.head, framed.keep_alive
            buf = buf[size:]
            if 100 <= head.status < 200:
                # Informational (100 Continue, 103 Early Hints): the real one follows.
                self._head_bytes += size
                continue
            break
        self._buf = b""
        self.head = head
        self._reusable = keep_alive
        self._state = _BODY
        self._mode = framed.mode
        if framed.mode == CHUNKED:
            self._chunk_left = 0
            self._chunk_line = b""
            self._chunk_trailer = False
        elif framed.mode == LENGTH:
            self._length_left = head.content_length or 0
        waiter = self._head_waiter
        self._head_waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_result(head)
        if self._mode == NONE or (self._mode == LENGTH and self._length_left == 0):
            # Bytes after a bodiless response are not the next response: never reuse then.
            self._finish(reusable=keep_alive and not buf)
        elif buf:
            self._feed_body(buf)

    def _feed_body(self, data: bytes) -> None:
        mode = self._mode
        if mode == LENGTH:
            left = self._length_left
            size = len(data)
            if size >= left:
                if left:
                    self._push(data if size == left else data[:left])
                self._length_left = 0
                self._finish(reusable=self._reusable and size == left)
                return
            self._length_left = left - size
            self._push(data)
        elif mode == CHUNKED:
            self._feed_chunked(data)
        elif mode == UNTIL_CLOSE:
            self._push(data)
        else:
            self._reusable = False
            self.abort()

    def _feed_chunked(self, data: bytes) -> None:
        pos, size = 0, len(data)
        while pos < size:
            left = self._chunk_left
            if left > 0:
                take = min(left, size - pos)
                self._push(data[pos:pos + take] if take != size or pos else data)
                pos += take
                left -= take
                # At the end of the chunk data, its CRLF follows (counted as -2, then -1).
                self._chunk_left = left if left else -2
                continue
            if left < 0:
                skip = min(-left, size - pos)
                if data[pos:pos + skip] != b"\r\n"[2 + left:2 + left + skip]:
                    self._protocol_error("chunk data not followed by CRLF")
                    return
                pos += skip
                self._chunk_left = left + skip
                continue
            newline = data.find(b"\n", pos)
            if newline < 0:
                self._chunk_line += data[pos:]
                if len(self._chunk_line) > MAX_CHUNK_LINE:
                    self._protocol_error("chunk size line too long")
                return
            line = self._chunk_line + data[pos:newline] if self._chunk_line else data[pos:newline]
            self._chunk_line = b""
            pos = newline + 1
            if len(line) > MAX_CHUNK_LINE or line[-1:] != b"\r":
                self._protocol_error(f"bad chunk line {line[:40]!r}")
                return
            line = line[:-1]
            if self._chunk_trailer:
                if not line:
                    self._finish(reusable=self._reusable and pos == size)
                    return
                continue  # trailer fields are dropped, as aiohttp did
            chunk_size = chunk_size_of(line)
            if chunk_size < 0:
                self._protocol_error(f"bad chunk size line {line[:40]!r}")
                return
            if chunk_size == 0:
                self._chunk_trailer = True
            else:
                self._chunk_left = chunk_size

    def _push(self, data: bytes) -> None:
        self._body.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def _finish(self, reusable: bool) -> None:
        self._state = _DONE
        self._reusable = reusable
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if self._state in (_DONE, _IDLE):
            return
        self._state = _DONE
        self._reusable = False
        self._error = exc
        waiter = self._head_waiter
        self._head_waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self._wake()

    def _protocol_error(self, message: str) -> None:
        self._fail(UpstreamProtocolError(message))
        self.abort()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class HostPool:
    """The connections to one backend origin: idle ones LIFO, a bound on the total."""

    __slots__ = ("_ssl", "active", "host", "idle", "limit", "loop", "port", "total", "waiters")

    def __init__(self, host: str, port: int, use_ssl: bool, limit: int,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.host = host
        self.port = port
        self._ssl: ssl.SSLContext | None = ssl.create_default_context() if use_ssl else None
        self.limit = limit
        self.loop = loop
        self.idle: deque[UpstreamConnection] = deque()
        self.active: set[UpstreamConnection] = set()
        self.total = 0  # open or opening, idle or busy
        self.waiters: deque[asyncio.Future[None]] = deque()

    def take_idle(self) -> UpstreamConnection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                self.active.add(conn)
                return conn
        return None

    async def connect(self, limit_seconds: float) -> UpstreamConnection:
        """A new connection, waiting for a free slot when the pool is at its limit."""
        async with asyncio.timeout(limit_seconds):
            while self.total >= self.limit:
                waiter = self.loop.create_future()
                self.waiters.append(waiter)
                try:
                    await waiter
                finally:
                    with contextlib.suppress(ValueError):
                        self.waiters.remove(waiter)
                conn = self.take_idle()
                if conn is not None:
                    return conn
            self.total += 1
            try:
                _, proto = await self.loop.create_connection(
                    lambda: UpstreamConnection(self), self.host, self.port, ssl=self._ssl,
                )
            except BaseException:
                self.total -= 1
                self._wake_one()
                raise
        conn = proto
        self.active.add(conn)
        return conn

    def put_idle(self, conn: UpstreamConnection) -> None:
        self.active.discard(conn)
        conn.idle_since = self.loop.time()
        if self.waiters:
            self.idle.append(conn)
            self._wake_one()
            return
        self.idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        """A connection closed; called once per connection. A closed idle one stays in the
        deque until `take_idle` or the sweep skips it (removing from the middle is O(n))."""
        self.active.discard(conn)
        self.total -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def sweep(self, now: float, read_timeout: float) -> None:
        for conn in [c for c in self.active if c.waiting_for_backend()]:
            if now - conn.last_io >= read_timeout:
                conn.timed_out()
        idle = self.idle
        while idle and (idle[0].closed or now - idle[0].idle_since >= IDLE_KEEP_SECONDS):
            conn = idle.popleft()
            if not conn.closed:
                conn.abort()

    def close(self) -> None:
        for conn in [*self.idle, *self.active]:
            conn.abort()
        self.idle.clear()


class UpstreamPools:
    """Every backend origin's pool in this process, plus the one sweep task for timeouts."""

    def __init__(self, *, max_per_backend: int, connect_timeout: float,
                 read_timeout: float) -> None:
        self.max_per_backend = max_per_backend
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.generation = 0  # the Runtime generation these settings came from
        self._pools: dict[tuple[str, int, bool], HostPool] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def configure(self, *, max_per_backend: int, connect_timeout: float,
                  read_timeout: float) -> None:
        """A config reload: new limits apply to new connections and the next sweep."""
        self.max_per_backend = max_per_backend
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        for pool in self._pools.values():
            pool.limit = max_per_backend

    def pool(self, host: str, port: int, use_ssl: bool) -> HostPool:
        key = (host, port, use_ssl)
        pool = self._pools.get(key)
        if pool is None:
            loop = asyncio.get_running_loop()
            pool = self._pools[key] = HostPool(host, port, use_ssl, self.max_per_backend, loop)
            if self._sweeper is None:
                self._sweeper = loop.create_task(self._sweep_forever())
        return pool

    async def exchange(self, pool: HostPool, request: bytes,
                       is_head: bool) -> tuple[UpstreamConnection, ResponseHead]:
        """Send one request; returns the connection (now owned by the caller) and the head.

        A pooled connection the backend closed while it sat idle fails before any response
        byte: the request is sent once more on a fresh connection.
        """
        conn = pool.take_idle()
        reused = conn is not None
        if conn is None:
            conn = await self._connect(pool)
        while True:
            try:
                head = await conn.send(request, is_head)
            except UpstreamDisconnected:
                conn.abort()
                if reused and not conn.got_bytes:
                    conn = await self._connect(pool)
                    reused = False
                    continue
                raise
            except BaseException:
                conn.abort()  # cancelled (client gone) or failed: the backend stops too
                raise
            return conn, head

    async def _connect(self, pool: HostPool) -> UpstreamConnection:
        try:
            return await pool.connect(self.connect_timeout)
        except TimeoutError as exc:
            raise UpstreamConnectTimeout(
                f"connecting to {pool.host}:{pool.port} timed out") from exc
        except OSError as exc:
            raise UpstreamConnectError(
                f"cannot connect to {pool.host}:{pool.port}: {exc.strerror or exc}") from exc

    async def _sweep_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # Timeouts fire between read_timeout and read_timeout + one period late.
            await asyncio.sleep(max(0.02, min(1.0, self.read_timeout / 4)))
            now = loop.time()
            for pool in list(self._pools.values()):
                pool.sweep(now, self.read_timeout)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
