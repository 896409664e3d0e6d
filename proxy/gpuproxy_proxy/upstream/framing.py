"""Strict HTTP/1.1 response framing for the upstream client (RFC 9110/9112): the head and the
chunk-size lines, parsed as pure functions so every rule is testable on bytes alone."""

from __future__ import annotations

from dataclasses import dataclass

# Chunk sizes are at most this many hex digits (2**64 - 1): no huge ints from a hostile backend.
MAX_CHUNK_SIZE_DIGITS = 16
# Content-Length is at most this many digits (below 2**63).
MAX_LENGTH_DIGITS = 18

# How the body after a head is delimited.
LENGTH, CHUNKED, UNTIL_CLOSE, NONE = 0, 1, 2, 3

NO_BODY_STATUS = frozenset({204, 304})
# RFC 9110 5.6.2 tchar: `name.translate(None, TOKEN_CHARS)` is empty for a valid field name.
TOKEN_CHARS = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
HEX_DIGITS = b"0123456789abcdefABCDEF"
WS = b" \t"
CR_LF_NUL = b"\r\n\0"
# Connection tokens that are options, not names of hop-by-hop fields.
CONNECTION_OPTIONS = frozenset({b"close", b"keep-alive", b""})


@dataclass(slots=True)
class ResponseHead:
    """The parsed head; `headers` already lacks the hop-by-hop ones its Connection header
    names (RFC 9110 7.6.1), so the caller forwards them as they are."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    content_length: int | None
    content_type: str


@dataclass(slots=True)
class FramedHead:
    """A parsed head, whether the connection may serve another request after this response,
    and how its body is delimited (LENGTH, CHUNKED, UNTIL_CLOSE or NONE)."""

    head: ResponseHead
    keep_alive: bool
    mode: int


def parse_response_head(raw: bytes, is_head: bool) -> FramedHead:
    """A response head (without its final blank line) checked strictly: ValueError (or
    UnicodeDecodeError) for anything a later parser could read differently."""
    # CR and LF only as the CRLF between lines, no NUL anywhere: a value holding them would
    # be split differently by whoever parses it next (the client, another proxy).
    lines = raw.split(b"\r\n")
    if len(raw) - len(raw.translate(None, CR_LF_NUL)) != 2 * (len(lines) - 1):
        raise ValueError("CR, LF or NUL inside the status line or a header field")
    status_line = lines[0]
    version = status_line[:8]
    code = status_line[9:12]
    if (version not in (b"HTTP/1.1", b"HTTP/1.0") or status_line[8:9] != b" "
            or len(code) != 3 or not code.isdigit() or status_line[12:13] not in (b"", b" ")):
        raise ValueError(f"not an HTTP/1.x status line: {status_line[:40]!r}")
    status = int(code)
    if status < 100:
        raise ValueError(f"status {status}")
    headers: list[tuple[str, str]] = []
    length: int | None = None
    codings: list[bytes] = []
    connection: set[bytes] = set()
    content_type = ""
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        # No whitespace before the colon, no obs-fold: only a token is a field name.
        if not sep or not name or name.translate(None, TOKEN_CHARS):
            raise ValueError(f"bad header line {line[:40]!r}")
        key = name.decode("ascii")
        raw_value = value.strip(WS)
        lower = key.lower()
        if lower == "content-length":
            # RFC 9110 8.6: 1*DIGIT, nothing else (no sign, no list, no inner space).
            if (not raw_value.isdigit() or len(raw_value) > MAX_LENGTH_DIGITS
                    or (length is not None and int(raw_value) != length)):
                raise ValueError(f"bad or conflicting Content-Length {raw_value[:40]!r}")
            length = int(raw_value)
        elif lower == "transfer-encoding":
            codings.extend(c.strip(WS).lower() for c in raw_value.split(b","))
        elif lower == "connection":
            if b"," in raw_value:
                connection.update(t.strip(WS).lower() for t in raw_value.split(b","))
            else:
                connection.add(raw_value.lower())
        val = raw_value.decode("utf-8", "surrogateescape")
        if lower == "content-type":
            content_type = val
        headers.append((key, val))
    if version == b"HTTP/1.0":
        keep_alive = b"keep-alive" in connection
    else:
        keep_alive = b"close" not in connection
    hop_by_hop = connection.difference(CONNECTION_OPTIONS)
    if hop_by_hop:
        # Fields the backend declared hop-by-hop are for us, never for the client.
        drop = {t.decode("latin-1") for t in hop_by_hop}
        headers = [(k, v) for k, v in headers if k.lower() not in drop]
        if "content-type" in drop:
            content_type = ""
    if codings:
        # Only chunked is understood; any other coding would reach the client undecoded
        # with its Transfer-Encoding header gone.
        if codings != [b"chunked"]:
            raise ValueError(f"unsupported Transfer-Encoding {b', '.join(codings)[:40]!r}")
        if length is not None or version == b"HTTP/1.0":
            keep_alive = False  # ambiguous framing (RFC 9112 6.1): close after this one
    if is_head or status in NO_BODY_STATUS or status < 200:
        mode = NONE
        if codings or length:
            # The head announces a body that must not be there: a backend that sends one
            # anyway would have its late bytes read as the next request's answer.
            keep_alive = False
    elif codings:
        mode = CHUNKED
        length = None  # Transfer-Encoding wins over Content-Length (RFC 9112 6.3)
    elif length is not None:
        mode = LENGTH
    else:
        mode = UNTIL_CLOSE
        keep_alive = False
    reason_text = status_line[13:].decode("latin-1")
    return FramedHead(ResponseHead(status, reason_text, headers, length, content_type),
                      keep_alive, mode)



def chunk_size_of(line: bytes) -> int:
    """The size of a chunk-size line (without its CRLF), or -1 when it is not strictly one."""
    size_field, semi, _ = line.partition(b";")
    if semi:
        size_field = size_field.rstrip(WS)  # BWS before a chunk extension
        if b"\r" in line or b"\0" in line:
            return -1
    # Hex digits only (no sign, 0x, underscore or space), and a bounded count of them.
    if (not size_field or len(size_field) > MAX_CHUNK_SIZE_DIGITS
            or size_field.translate(None, HEX_DIGITS)):
        return -1
    return int(size_field, 16)
