"""What a request tells the router, read from its raw JSON bytes without parsing them: the
model, a prefix key (the leading system message, else the first bytes of the messages or
prompt) and a session key (a header or the OpenAI `user` field).

Regular expressions over bytes run in C; a quote inside a JSON string is always escaped, so
`"model":` can only be a key. The first match is taken: a nested key of the same name in a
tool schema placed before the top-level one would be misread (it only changes routing).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

_STRING = rb'"[^"\\]*(?:\\.[^"\\]*)*"'  # unrolled: fast on long runs without escapes
_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,256})"')
_USER = re.compile(rb'"user"\s*:\s*(' + _STRING + rb')')
_TEXT = re.compile(rb'"(?:messages|prompt)"\s*:\s*')
# The leading system (or developer) message as the OpenAI SDKs write it: role, then content,
# or content, then role. The content string itself is skipped with bytes.find (memchr speed:
# 0.1 us for 6 KiB, where a regex takes 35 us), and by a regex bounded to the window only
# when it holds many escaped quotes.
_ROLE_FIRST = re.compile(
    rb'\[\s*\{\s*"role"\s*:\s*"(?:system|developer)"\s*,\s*"content"\s*:\s*"')
_CONTENT_FIRST = re.compile(rb'\[\s*\{\s*"content"\s*:\s*"')
_ROLE_AFTER = re.compile(rb'\s*,\s*"role"\s*:\s*"(?:system|developer)"')
_STRING_REST = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*"')
_FIND_TRIES = 16


@dataclass(frozen=True, slots=True)
class RequestHints:
    model: str | None = None
    prefix_key: int | None = None
    session_key: int | None = None


def stable_hash(data: bytes) -> int:
    """64 bits every process and replica computes alike (Python's hash() is salted)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def request_model(body: bytes) -> str | None:
    match = _MODEL.search(body)
    return match.group(1).decode("utf-8", "replace") if match else None


def prefix_span(body: bytes, prefix_bytes: int, max_bytes: int) -> memoryview | None:
    """The bytes a prefix key is computed from (a view: no copy): from the messages or prompt
    on, through the leading system message when there is one (capped at max_bytes), else
    prefix_bytes."""
    text = _TEXT.search(body)
    if text is None:
        return None
    start = text.end()
    limit = start + max_bytes
    end = _system_end(body, start, limit)
    return memoryview(body)[start:end if end > 0 else start + prefix_bytes]


def _system_end(body: bytes, start: int, limit: int) -> int:
    """Where the leading system message ends (at most limit: a longer one is keyed on its
    beginning), or -1 without one."""
    head = _ROLE_FIRST.match(body, start)
    if head is not None:
        # Role first: the content closes the message, `..."}`; a quote there is escaped far
        # less often than one anywhere in a prompt (JSON or code in it).
        end = _string_end(body, head.end(), limit, b'"}')
        if end < 0:
            end = _string_end(body, head.end(), limit)
        return end if end > 0 else limit
    head = _CONTENT_FIRST.match(body, start)
    if head is None:
        return -1
    end = _string_end(body, head.end(), limit)
    role = _ROLE_AFTER.match(body, end) if end > 0 else None
    return min(role.end(), limit) if role is not None else -1


def _string_end(body: bytes, start: int, limit: int, closing: bytes = b'"') -> int:
    """The index after the closing quote of the JSON string whose text begins at start, or
    -1 when it does not close before limit; with `closing` '"}' only a quote followed by a
    brace counts (and -1 may just mean: not found that way)."""
    pos = start
    for _ in range(_FIND_TRIES):
        quote = body.find(closing, pos, limit)
        if quote < 0:
            return -1
        slashes = quote
        while slashes > start and body[slashes - 1] == 0x5C:  # backslash
            slashes -= 1
        if (quote - slashes) % 2 == 0:  # an even run of backslashes escapes nothing
            return quote + 1
        pos = quote + 1
    if closing != b'"':
        return -1
    rest = _STRING_REST.match(body, pos, limit)  # many escaped quotes: one bounded C scan
    return rest.end() if rest is not None else -1


def prefix_key(body: bytes, model: str | None, prefix_bytes: int, max_bytes: int) -> int | None:
    span = prefix_span(body, prefix_bytes, max_bytes)
    if span is None:
        return None
    # The model is part of the key: a prompt cached for one model is no use to another.
    digest = hashlib.blake2b((model or "").encode() + b"\0", digest_size=8)
    digest.update(span)
    return int.from_bytes(digest.digest(), "big")


def session_key(headers: Mapping[str, str], body: bytes, header: str) -> int | None:
    value = headers.get(header)
    if value:
        return stable_hash(b"h\0" + value.encode("utf-8", "surrogateescape"))
    match = _USER.search(body)
    if match is None or len(match.group(1)) <= 2:
        return None
    return stable_hash(b"u\0" + match.group(1))
