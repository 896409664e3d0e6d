"""The upstream request head built from the raw header bytes says exactly what the decoded
`forward_pairs` (the cold paths' headers) says, byte for byte."""

from __future__ import annotations

from typing import Any, cast

import pytest
from multidict import CIMultiDict

from gpuproxy_proxy.http.request import Request
from gpuproxy_proxy.upstream.forward import forward_head, forward_pairs, request_bytes

CASES: list[list[tuple[bytes, bytes]]] = [
    [(b"Host", b"proxy:8080"), (b"Authorization", b"Bearer abc"), (b"Accept", b"*/*")],
    [(b"Host", b"h"), (b"Connection", b"keep-alive, X-Custom"), (b"X-Custom", b"drop me"),
     (b"x-api-key", b"gpx_1"), (b"Keep-Alive", b"timeout=5"), (b"X-Kept", b"yes")],
    [(b"X-Forwarded-For", b"203.0.113.7"), (b"X-Request-ID", b"client-id"),
     (b"X-Forwarded-Proto", b"https"), (b"TE", b"trailers"), (b"Upgrade", b"h2c")],
    [(b"X-Bytes", b"\xff\xfe not utf-8 \xc3\xa9"), (b"Accept", b"a"), (b"accept", b"b"),
     (b"Content-Length", b"4"), (b"Expect", b"100-continue")],
]


def lean_request(pairs: list[tuple[bytes, bytes]], method: str = "GET") -> Request:
    # Decoded as http/protocol.py decodes them.
    headers: CIMultiDict[str] = CIMultiDict(
        [(n.decode("latin-1"), v.decode("utf-8", "surrogateescape")) for n, v in pairs])
    return Request(cast(Any, None), method, "/v1/x?q=%C3%A9", headers, "192.0.2.4", "1.1",
                   True, 1 << 20, None, pairs)


def encoded(pairs: list[tuple[str, str]]) -> bytes:
    return "".join(f"{k}: {v}\r\n" for k, v in pairs).encode("utf-8", "surrogateescape")


@pytest.mark.parametrize("pairs", CASES)
@pytest.mark.parametrize("strip", [True, False])
def test_forward_head_matches_forward_pairs(pairs: list[tuple[bytes, bytes]],
                                            strip: bool) -> None:
    request = lean_request(pairs)
    assert forward_head(request, "rid-1", strip) == encoded(
        forward_pairs(request, "rid-1", strip))


def test_request_bytes_frames_the_body() -> None:
    request = lean_request(CASES[0], "POST")
    lines = forward_head(request, "rid-2", True)
    assert request_bytes("POST", "/p/v1/x", "b:1", lines, b"{}") == (
        b"POST /p/v1/x HTTP/1.1\r\nHost: b:1\r\nAccept: */*\r\nX-Forwarded-For: 192.0.2.4\r\n"
        b"X-Forwarded-Proto: http\r\nX-Request-ID: rid-2\r\nContent-Length: 2\r\n\r\n{}")
    assert request_bytes("GET", "/x", "b:1", b"", b"") == b"GET /x HTTP/1.1\r\nHost: b:1\r\n\r\n"
    assert request_bytes("PUT", "/x", "b:1", b"", b"").endswith(b"Content-Length: 0\r\n\r\n")
