"""Responses of the lean front end: a whole response in one `transport.write`, and a
streaming writer (chunked or length-framed) that coalesces its head with the first chunk and
waits only while the client's transport is paused."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from gpuproxy_proxy.http.protocol import HttpConnection

_REASONS = {s.value: s.phrase for s in HTTPStatus}
_STATUS_LINES: dict[int, bytes] = {}
_CRLF = b"\r\n"
_LAST_CHUNK = b"0\r\n\r\n"


def status_line(status: int, reason: str | None = None) -> bytes:
    if reason is None:
        line = _STATUS_LINES.get(status)
        if line is None:
            line = _STATUS_LINES[status] = (
                f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n".encode())
        return line
    return f"HTTP/1.1 {status} {reason}\r\n".encode("latin-1", "replace")


def no_body_status(status: int) -> bool:
    return status < 200 or status in (204, 304)


def encode_head(status: int, reason: str | None, headers: Iterable[tuple[str, str]],
                framing: bytes, close: bool) -> bytes:
    """Status line, headers, the framing header(s) and the blank line."""
    # One encode for all lines; values decoded with surrogateescape go back byte for byte.
    lines = "".join([f"{key}: {value}\r\n" for key, value in headers])
    return b"".join((status_line(status, reason), lines.encode("utf-8", "surrogateescape"),
                     framing, b"Connection: close\r\n" if close else b"", _CRLF))


class Response:
    """A whole response held in memory (the small bodies the proxy answers with)."""

    __slots__ = ("body", "close", "headers", "reason", "status")

    def __init__(self, status: int = 200, body: bytes = b"", *,
                 headers: Iterable[tuple[str, str]] | Mapping[str, str] = (),
                 reason: str | None = None, content_type: str | None = None) -> None:
        self.status = status
        self.reason = reason
        items = headers.items() if isinstance(headers, Mapping) else headers
        self.headers: list[tuple[str, str]] = list(items)
        if content_type is not None:
            self.headers.append(("Content-Type", content_type))
        self.body = body
        self.close = False

    def force_close(self) -> None:
        self.close = True

    def encode(self, close: bool, head_only: bool = False) -> bytes:
        body = self.body
        framing = b"" if no_body_status(self.status) else (
            b"Content-Length: " + str(len(body)).encode() + _CRLF)
        head = encode_head(self.status, self.reason, self.headers, framing, close)
        return head if head_only or not body else head + body


def from_aiohttp(resp: web.Response | web.HTTPException) -> Response:
    """The JSON errors and rate-limit answers built as aiohttp objects (shared with aiohttp
    apps) as a lean Response."""
    if isinstance(resp, web.HTTPException):
        body = (resp.text or "").encode()
        return Response(resp.status, body, headers=resp.headers.items(), reason=resp.reason)
    raw = resp.body
    payload = raw if isinstance(raw, bytes) else b"" if raw is None else bytes(raw)  # type: ignore[arg-type]
    headers = [(k, v) for k, v in resp.headers.items()
               if k.lower() not in ("content-length", "connection", "transfer-encoding")]
    out = Response(resp.status, payload, headers=headers, reason=resp.reason)
    if resp.keep_alive is False:
        out.close = True
    return out


class StreamResponse:
    """A response written as the body arrives. The head goes out with the first chunk (or at
    `write_eof`), so a short stream costs one write per upstream read."""

    __slots__ = (
        "_chunked",
        "_conn",
        "_done",
        "_head",
        "_head_only",
        "_started",
        "body_length",
        "close",
        "content_length",
        "headers",
        "reason",
        "status",
    )

    def __init__(self, status: int = 200, reason: str | None = None, *,
                 headers: Iterable[tuple[str, str]] = ()) -> None:
        self.status = status
        self.reason = reason
        self.headers = list(headers)
        self.content_length: int | None = None
        self.body_length = 0
        self.close = False
        self._conn: HttpConnection | None = None
        self._head: bytes | None = None
        self._chunked = False
        self._head_only = False
        self._started = False
        self._done = False

    @property
    def prepared(self) -> bool:
        return self._started

    def force_close(self) -> None:
        self.close = True

    async def prepare(self, request: object) -> None:
        """Bind to the request's connection and build the head (sent with the first chunk)."""
        from gpuproxy_proxy.http.request import Request

        assert isinstance(request, Request)
        conn = request._conn
        self._conn = conn
        self._started = True
        close = conn.closing_after(request) or self.close
        self.close = close
        self._head_only = request.method == "HEAD" or no_body_status(self.status)
        if self._head_only:
            framing = (b"" if self.content_length is None
                       else b"Content-Length: " + str(self.content_length).encode() + _CRLF)
        elif self.content_length is not None:
            framing = b"Content-Length: " + str(self.content_length).encode() + _CRLF
        elif request.version == "1.1":
            framing = b"Transfer-Encoding: chunked\r\n"
            self._chunked = True
        else:
            framing = b""  # HTTP/1.0: the body ends where the connection does
            self.close = close = True
        self._head = encode_head(self.status, self.reason, self.headers, framing, close)

    async def write(self, data: bytes) -> None:
        conn = self._conn
        assert conn is not None, "prepare() first"
        if self._done:
            raise RuntimeError("the response has ended")
        if not data or self._head_only:
            return
        self.body_length += len(data)
        if self._chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        head = self._head
        if head is not None:
            self._head = None
            data = head + data
        await conn.send(data)

    async def write_eof(self) -> None:
        conn = self._conn
        assert conn is not None, "prepare() first"
        if self._done:
            return
        self._done = True
        tail = _LAST_CHUNK if self._chunked else b""
        head = self._head
        if head is not None:
            self._head = None
            tail = head + tail
        if tail:
            await conn.send(tail)

    @property
    def finished(self) -> bool:
        return self._done


# What a handler of the client port returns: lean responses on the hot path, aiohttp's
# web.Response for the JSON errors shared with aiohttp apps (written by from_aiohttp).
Answer = Response | StreamResponse | web.Response
