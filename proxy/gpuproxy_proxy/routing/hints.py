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
# or content, then role.
_SYSTEM = re.compile(
    rb'\[\s*\{\s*"role"\s*:\s*"(?:system|developer)"\s*,\s*"content"\s*:\s*' + _STRING
    + rb'|\[\s*\{\s*"content"\s*:\s*' + _STRING + rb'\s*,\s*"role"\s*:\s*"(?:system|developer)"')


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


def prefix_span(body: bytes, prefix_bytes: int, max_bytes: int) -> bytes | None:
    """The bytes a prefix key is computed from: from the messages or prompt on, through the
    leading system message when there is one (capped at max_bytes), else prefix_bytes."""
    text = _TEXT.search(body)
    if text is None:
        return None
    start = text.end()
    system = _SYSTEM.match(body, start)
    end = min(system.end(), start + max_bytes) if system else start + prefix_bytes
    return body[start:end]


def prefix_key(body: bytes, model: str | None, prefix_bytes: int, max_bytes: int) -> int | None:
    span = prefix_span(body, prefix_bytes, max_bytes)
    if span is None:
        return None
    # The model is part of the key: a prompt cached for one model is no use to another.
    return stable_hash((model or "").encode() + b"\0" + span)


def session_key(headers: Mapping[str, str], body: bytes, header: str) -> int | None:
    value = headers.get(header)
    if value:
        return stable_hash(b"h\0" + value.encode("utf-8", "surrogateescape"))
    match = _USER.search(body)
    if match is None or len(match.group(1)) <= 2:
        return None
    return stable_hash(b"u\0" + match.group(1))
