"""One client connection of the lean front end: an asyncio.Protocol on httptools' parser.

httptools wraps llhttp, the strict HTTP/1.1 parser of Node.js that uvicorn uses too: it
refuses Content-Length with Transfer-Encoding, duplicate lengths, obs-fold and bad framing.
Requests are answered in order (pipelining); a handler task exists only while a request is in
progress, and an idle connection holds no buffer, no task and no timer of its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, cast

import httptools
from multidict import CIMultiDict

from gpuproxy_proxy.http.deadlines import NOT_READING, DeadlineHooks
from gpuproxy_proxy.http.errors import error_body
from gpuproxy_proxy.http.request import Request
from gpuproxy_proxy.http.requestid import new_request_id
from gpuproxy_proxy.http.response import Response
from gpuproxy_proxy.observability.logging import UNHANDLED_LOGGER

if TYPE_CHECKING:
    from gpuproxy_proxy.http.frontend import Frontend

log = logging.getLogger("gpuproxy.http")
# Bugs (a 500 the proxy caused): pinned at ERROR (observability/logging.py), no parent's or
# root's level can silence it.
unhandled = logging.getLogger(UNHANDLED_LOGGER)
unhandled.setLevel(logging.ERROR)

# aiohttp's limits, which the proxy had before: one line, one header, and the whole head.
MAX_TARGET_BYTES = 8190
MAX_FIELD_BYTES = 8190
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 128
# Requests parsed ahead of the one being answered before reading from the client pauses.
_PIPELINE_DEPTH = 2
# A connection closed with unread input would reset (RST) and could destroy its last answer:
# what still comes is read and dropped this long.
LINGER_SECONDS = 2.0
_METHODS = {m.encode(): m for m in ("GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS",
                                    "PATCH")}


class HeadTooLarge(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def error_response(status: int, kind: str, message: str, request_id: str) -> Response:
    resp = Response(status, error_body(kind, message, request_id),
                    headers=[("Content-Type", "application/json"), ("X-Request-ID", request_id)])
    resp.close = True
    return resp


class HttpConnection(DeadlineHooks, asyncio.Protocol):
    """Parser callbacks feed Request objects; `_serve` answers them one after the other."""

    __slots__ = (
        "_closing",
        "_current",
        "_drain",
        "_error",
        "_head_bytes",
        "_headers",
        "_linger",
        "_lost",
        "_parser",
        "_parsing",
        "_partial",
        "_peer",
        "_queue",
        "_read_paused",
        "_server",
        "_stopped",
        "_task",
        "_url",
        "_write_paused",
        "sweep_key",
        "transport",
    )

    def __init__(self, server: Frontend) -> None:
        self._server = server
        self.transport: asyncio.Transport | None = None
        self._parser: httptools.HttpRequestParser | None = None  # made on the first byte
        self._url: list[bytes] | None = None
        self._headers: list[tuple[bytes, bytes]] | None = None
        self._head_bytes = 0
        self._parsing: Request | None = None  # the request whose body is arriving
        self._current: Request | None = None  # the request being answered
        self._queue: deque[Request] | None = None  # pipelined requests, parsed ahead
        self._task: asyncio.Task[None] | None = None
        self.sweep_key: int | None = None
        self._partial = False  # a request head has begun
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._read_paused = False
        self._reading = NOT_READING  # which read deadline watches it
        self._lost = False
        self._closing = False
        self._stopped = False  # parsing stopped (an error or an upgrade): close when answered
        self._error: Response | None = None  # a parse error, answered after what precedes it
        self._peer: str | None = None
        self._linger: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are no asyncio.Transport subclass, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        self._server.connection_made(self)

    def data_received(self, data: bytes) -> None:
        if self._closing or self._stopped:
            return  # lingering, or input after a parse error: dropped
        parser = self._parser
        if parser is None:
            parser = self._parser = httptools.HttpRequestParser(self)
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # No protocol switch here (Upgrade is not forwarded): answer what was asked,
            # then close, as the bytes after the head belong to another protocol.
            self._fail(None)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__  # what the callback raised
            if isinstance(cause, HeadTooLarge):
                self._fail(error_response(cause.status, "request_too_large", str(cause),
                                          new_request_id()))
            else:
                request_id = new_request_id()
                unhandled.error("HTTP parser callback failed", exc_info=cause or exc,
                                extra={"request_id": request_id})
                self._fail(error_response(500, "internal_error", "the proxy failed to parse "
                                          "this request (logged)", request_id))
        except httptools.HttpParserError as exc:
            message = f"malformed HTTP request: {exc}"
            self._fail(error_response(400, "invalid_request_error", message, new_request_id()))
        # Checked once per read, not per callback: a head or body that arrives whole in one
        # read (nearly all) is never put on a deadline wheel.
        if (self._partial or self._parsing is not None) and not self._reading:
            self._watch_read()

    def eof_received(self) -> bool:
        # As aiohttp did: a client that half-closes is gone; its handler is cancelled.
        return False

    def pause_writing(self) -> None:
        self._write_paused = True
        wheel = self._server.deadlines.write
        if self not in wheel:  # (a closing one that could not flush keeps its start)
            wheel.watch(self)

    def resume_writing(self) -> None:
        self._write_paused = False
        if not self._closing:  # a closing one stays watched until it has flushed
            self._server.deadlines.write.unwatch(self)
        waiter = self._drain
        if waiter is not None:
            self._drain = None
            if not waiter.done():
                waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._server.connection_lost(self)
        if self._reading:
            self._end_read_deadline()
        self._server.deadlines.write.unwatch(self)
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        task = self._task
        if task is not None and not task.done():
            task.cancel()  # the client hung up: the upstream request is closed with it
        waiter = self._drain
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("the client closed the connection"))
        self._drain = None
        self._parser = None  # the parser refers back to this object
        self._queue = None
        self._parsing = None

    # --- parser callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._partial = True
        self._url = []
        self._headers = []
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        assert self._url is not None
        self._url.append(url)
        self._head_bytes += len(url)
        if self._head_bytes > MAX_TARGET_BYTES:
            raise HeadTooLarge(414, f"the request target is longer than {MAX_TARGET_BYTES} "
                               "bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        assert headers is not None
        size = len(name) + len(value)
        self._head_bytes += size
        if size > MAX_FIELD_BYTES:
            raise HeadTooLarge(431, f"header {name.decode('latin-1')!r} is longer than "
                               f"{MAX_FIELD_BYTES} bytes")
        if self._head_bytes > MAX_HEAD_BYTES or len(headers) >= MAX_HEADERS:
            raise HeadTooLarge(431, f"the request head exceeds {MAX_HEAD_BYTES} bytes or "
                               f"{MAX_HEADERS} headers")
        headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._reading:
            self._end_read_deadline()
        parser, url, pairs = self._parser, self._url, self._headers
        assert parser is not None
        assert url is not None
        assert pairs is not None
        raw_method = parser.get_method()
        method = _METHODS.get(raw_method) or raw_method.decode("ascii", "replace")
        # Values as aiohttp decoded them (utf-8, surrogateescape): the same bytes go upstream.
        headers: CIMultiDict[str] = CIMultiDict(
            [(n.decode("latin-1"), v.decode("utf-8", "surrogateescape"))
             for n, v in pairs])
        target = b"".join(url).decode("utf-8", "surrogateescape")
        self._url = self._headers = None
        self._partial = False
        server = self._server
        request = Request(self, method, target, headers, self._remote(),
                          parser.get_http_version(), parser.should_keep_alive(),
                          server.max_body, server.app, pairs)
        self._parsing = request
        if self._current is None:
            self._start(request)
            return
        queue = self._queue
        if queue is None:
            queue = self._queue = deque()
        queue.append(request)
        if len(queue) >= _PIPELINE_DEPTH:
            self._pause_reading()

    def on_body(self, body: bytes) -> None:
        request = self._parsing
        if request is not None and not request.feed(body):
            # Over the limit after its answer went out: stop reading, close.
            self._parsing = None
            self._close_lingering()

    def on_message_complete(self) -> None:
        if self._reading:
            self._end_read_deadline()
        request = self._parsing
        self._parsing = None
        if request is not None:
            request.finish()

    # --- requests -------------------------------------------------------------------------

    def _remote(self) -> str | None:
        peer = self._peer
        if peer is None and self.transport is not None:
            name = self.transport.get_extra_info("peername")
            peer = self._peer = str(name[0]) if isinstance(name, tuple) else None
        return peer

    def _start(self, request: Request) -> None:
        self._server.sweep.unwatch(self)
        self._current = request
        self._task = asyncio.get_running_loop().create_task(self._serve(request))

    async def _serve(self, request: Request) -> None:
        server = self._server
        while True:
            try:
                close = await server.respond(self, request)
            except Exception:
                # respond() answers handler failures itself; this is a bug in writing the
                # answer: the connection cannot be trusted to be in step any more.
                unhandled.exception("failed to write an answer; closing the connection",
                                    extra={"request_id": request.request_id})
                self._task = None
                self._current = None
                self.abort()
                return
            if close or self._lost:
                self._task = None
                self._current = None
                self._finish_closing(request)
                return
            if not request.body_complete:
                request.discard()  # answered without its body: the rest is dropped
            queue = self._queue
            if not queue:
                break
            request = queue.popleft()
            self._current = request
            if self._read_paused and len(queue) < _PIPELINE_DEPTH:
                self._resume_reading()
        self._task = None
        self._current = None
        if self._stopped:
            self._write_error()
            return
        if server.draining:
            self.close()
            return
        if not self._partial:  # a next head under way has its own deadline
            server.sweep.watch(self)  # idle: waiting for the next request

    def _finish_closing(self, request: Request) -> None:
        if self._lost:
            return
        if request.body_complete and self._parsing is None and not self._stopped:
            self.close()
        else:
            self._close_lingering()

    def closing_after(self, request: Request) -> bool:
        """Whether the answer to `request` ends the connection (it says so in its head)."""
        return (not request.keep_alive or self._server.draining or self._closing
                or (self._stopped and self._error is None and not self._queue)
                or (request.expect_continue and not request.body_complete))

    async def send(self, data: bytes) -> None:
        """Write, then wait while the client's buffer is above its high-water mark."""
        transport = self.transport
        if self._lost or transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        transport.write(data)
        if self._write_paused:
            waiter = self._drain
            if waiter is None:
                waiter = self._drain = asyncio.get_running_loop().create_future()
            await waiter

    def write_raw(self, data: bytes) -> None:
        if not self._lost and self.transport is not None:
            self.transport.write(data)

    def _fail(self, resp: Response | None) -> None:
        """Parsing stopped: answer the requests before it, then `resp` (if any), then close."""
        if self._reading:
            self._end_read_deadline()
        self._pause_reading()
        self._stopped = True
        request = self._parsing
        self._parsing = None
        if request is not None:
            # Its body cannot complete: its handler gets the error when it reads the body.
            request.fail(resp or error_response(400, "invalid_request_error", "protocol "
                                                "upgrades are not supported",
                                                request.request_id))
            resp = None
        self._error = resp
        if self._current is None:
            self._write_error()

    def _write_error(self) -> None:
        resp = self._error
        if resp is not None and not self._lost and self.transport is not None:
            self.transport.write(resp.encode(True))
        self._close_lingering()

    # --- states ---------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """Waiting for a request, none begun: closing it loses nothing."""
        return self._current is None and not self._partial and not self._closing

    def expire(self) -> None:
        """The keep-alive timeout passed (also one whose next request head is unfinished)."""
        if self._current is None:
            self.close()

    def _pause_reading(self) -> None:
        if not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._read_paused and self.transport is not None and not self._closing:
            self._read_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        """Close once what was written is sent."""
        self._closing = True
        if self.transport is not None:
            self._watch_flush(self.transport)
            self.transport.close()

    def abort(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.abort()

    def _close_lingering(self) -> None:
        """Close after our answer without resetting it: stop sending, drop what still comes
        until the client closes or LINGER_SECONDS pass."""
        transport = self.transport
        if self._closing or transport is None:
            return
        self._closing = True
        if self._read_paused:
            self._read_paused = False
            transport.resume_reading()
        self._watch_flush(transport)
        if transport.can_write_eof():
            transport.write_eof()
            self._linger = asyncio.get_running_loop().call_later(LINGER_SECONDS,
                                                                  transport.close)
        else:
            transport.close()

    def reject(self, answer: bytes) -> None:
        """Over the connection cap: answer at once and close (lingering)."""
        self._stopped = True  # no request of it is parsed
        assert self.transport is not None
        self.transport.write(answer)
        self._close_lingering()

    def read_timed_out(self, message: str) -> str:
        """The head or body deadline passed (http/deadlines.py): a 408 after the answers before
        it, then close. Returns the 408's request id."""
        request = self._parsing
        request_id = request.request_id if request is not None else new_request_id()
        self._fail(error_response(408, "request_timeout", message, request_id))
        return request_id
