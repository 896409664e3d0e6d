"""One parsed client request of the lean front end: head fields in `__slots__`, the body
buffered as it arrives (bounded by limits.max_body_bytes), read whole by the handler."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qsl, unquote

from multidict import CIMultiDict, MultiDict, MultiDictProxy, MultiMapping

from gpuproxy_proxy.http.paths import BadPath, normalize_path
from gpuproxy_proxy.http.requestid import client_request_id

if TYPE_CHECKING:
    from gpuproxy_proxy.http.protocol import HttpConnection
    from gpuproxy_proxy.http.response import Response

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class ClientRequest(Protocol):
    """What auth, client addresses and request ids read: the lean Request and aiohttp's."""

    @property
    def headers(self) -> MultiMapping[str]: ...

    @property
    def remote(self) -> str | None: ...


class BodyTooLarge(Exception):
    """The request body passed limits.max_body_bytes; the rest of it is not read."""


class BadBody(Exception):
    """The body's framing is broken (the parser stopped): `answer` is the 400 to send."""

    def __init__(self, answer: Response) -> None:
        super().__init__("malformed request body")
        self.answer = answer


class Request:
    """A request as the handler sees it; the connection feeds its body."""

    __slots__ = (
        "_chunks",
        "_complete",
        "_conn",
        "_discard",
        "_failure",
        "_max_body",
        "_request_id",
        "_size",
        "_too_large",
        "_waiter",
        "app",
        "chunked",
        "content_length",
        "expect_continue",
        "headers",
        "keep_alive",
        "method",
        "path",
        "path_error",
        "query_string",
        "raw_headers",
        "remote",
        "target",
        "version",
    )
    scheme = "http"

    def __init__(self, conn: HttpConnection, method: str, target: str,
                 headers: CIMultiDict[str], remote: str | None, version: str,
                 keep_alive: bool, max_body: int, app: Any,
                 raw_headers: list[tuple[bytes, bytes]]) -> None:
        self._conn = conn
        self.method = method
        raw_path, sep, self.query_string = target.partition("?")
        self.path_error: str | None = None  # answered with a 400 before routing
        try:
            normal = normalize_path(raw_path)
        except BadPath as exc:
            normal, self.path_error = raw_path, str(exc)
        # Normalized, not decoded: what goes upstream is the path the router matched.
        self.target = target if normal == raw_path else normal + sep + self.query_string
        self.path = unquote(normal) if "%" in normal else normal
        self.headers = headers
        # As received: forwarded upstream without decoding and encoding them again.
        self.raw_headers = raw_headers
        self.remote = remote
        self.version = version
        self.keep_alive = keep_alive
        self.app = app
        length = headers.get("Content-Length")
        # llhttp has checked it: digits only, one value, never with Transfer-Encoding.
        self.content_length = int(length) if length is not None else None
        self.chunked = "Transfer-Encoding" in headers
        self.expect_continue = headers.get("Expect", "").lower() == "100-continue"
        self._request_id: str | None = None
        self._chunks: list[bytes] | None = None  # no buffer until body bytes arrive
        self._size = 0
        self._max_body = max_body
        self._complete = False
        self._too_large = False
        self._discard = False
        self._failure: Response | None = None
        self._waiter: asyncio.Future[None] | None = None

    @property
    def request_id(self) -> str:
        """The client's X-Request-ID when safe to echo, else a new one; fixed per request."""
        rid = self._request_id
        if rid is None:
            rid = self._request_id = client_request_id(self.headers)
        return rid

    @property
    def query(self) -> MultiDictProxy[str]:
        return MultiDictProxy(MultiDict(parse_qsl(self.query_string, keep_blank_values=True)))

    @property
    def body_exists(self) -> bool:
        return self.chunked or bool(self.content_length)

    @property
    def body_complete(self) -> bool:
        return self._complete

    @property
    def received(self) -> int:
        """Body bytes arrived so far (also those past the limit)."""
        return self._size

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._conn.transport

    async def read(self) -> bytes:
        """The whole body; raises BodyTooLarge past the limit (without waiting for the rest)."""
        if not self._complete and not self._too_large and self._failure is None:
            if self.expect_continue:
                self.expect_continue = False
                self._conn.write_raw(_CONTINUE)
                self._conn.continue_sent(self)
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self._failure is not None:
            raise BadBody(self._failure)
        if self._too_large:
            raise BodyTooLarge()
        chunks = self._chunks
        if not chunks:
            return b""
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def json(self) -> Any:
        return json.loads(await self.read())

    # --- fed by the connection ---------------------------------------------------------------

    def feed(self, data: bytes) -> bool:
        """Body bytes; False when the request went past the limit while nobody reads it (the
        connection then closes instead of reading on)."""
        self._size += len(data)
        if self._size > self._max_body:
            if not self._too_large:
                self._too_large = True
                self._chunks = None
                self._wake()
            return not self._discard
        if self._discard or self._too_large:
            return True
        if self._chunks is None:
            self._chunks = [data]
        else:
            self._chunks.append(data)
        return True

    def finish(self) -> None:
        self._complete = True
        self._wake()

    def fail(self, answer: Response) -> None:
        """The rest of the body cannot be parsed: reading it raises BadBody(answer)."""
        self._failure = answer
        self._wake()

    def discard(self) -> None:
        """The answer is out without the body: what still arrives is dropped."""
        self._discard = True
        self._chunks = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
