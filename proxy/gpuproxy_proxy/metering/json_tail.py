"""Usage in a JSON body of any size, chunked or not, seen as it streams by: the first and the
last ~16 KiB are kept (references to the chunks, no copies), never the whole body.

`usage` is looked for as a top-level key at the end (where OpenAI and vLLM put it), then at the
start (some servers). A body up to 64 KiB is parsed whole, as the proxy always did.
"""

from __future__ import annotations

import json
import re
from collections import deque

from gpuproxy_proxy.metering.usage import Usage, usage_from_json, usage_from_object

_HEAD = 16 * 1024
_TAIL = 16 * 1024
_WHOLE = 64 * 1024
_USAGE = b'"usage"'
# JSON tokens that matter for nesting: whole strings (skipped), brackets; a lone quote is a
# string cut off by the end of the window.
_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\]]|"')
_OBJECT_VALUE = re.compile(r'\s*:\s*\{')
_DECODER = json.JSONDecoder()


def _escaped(data: bytes, idx: int) -> bool:
    """Whether the quote at data[idx] is escaped (inside a string)."""
    count = 0
    while idx - count > 0 and data[idx - count - 1] == 0x5C:  # backslash
        count += 1
    return count % 2 == 1


def _object_at(text: str, pos: int) -> tuple[dict[str, object], int] | None:
    """The `{...}` value after a key ending at `pos`, and where it ends."""
    match = _OBJECT_VALUE.match(text, pos)
    if match is None:
        return None
    try:
        value, end = _DECODER.raw_decode(text, match.end() - 1)
    except ValueError:
        return None
    return (value, end) if isinstance(value, dict) else None


def _closes_root(text: str, pos: int) -> bool:
    """Whether text[pos:] (outside any string) closes exactly one level, at its very end:
    what came before `pos` was a member of the top-level object."""
    depth = 0
    for token in _TOKENS.finditer(text, pos):
        char = token.group()
        if char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth < 0:
                return not text[token.end():].strip()
        elif char == '"' and len(token.group()) == 1:
            return False
    return False


def usage_at_end(tail: bytes) -> Usage | None:
    """The top-level usage object in the last part of a JSON document."""
    idx = tail.rfind(_USAGE)
    while idx != -1:
        if not _escaped(tail, idx):
            text = tail[idx + len(_USAGE):].decode("utf-8", "replace")
            found = _object_at(text, 0)
            if found is not None and _closes_root(text, found[1]):
                usage = usage_from_object({"usage": found[0]})
                if usage is not None:
                    return usage
        idx = tail.rfind(_USAGE, 0, idx)
    return None


def usage_at_start(head: bytes) -> Usage | None:
    """The top-level usage object in the first part of a JSON document (nesting tracked)."""
    if _USAGE not in head:
        return None
    text = head.decode("utf-8", "replace")
    depth = 0
    for token in _TOKENS.finditer(text):
        value = token.group()
        if value == '"usage"' and depth == 1:
            found = _object_at(text, token.end())
            if found is not None:
                return usage_from_object({"usage": found[0]})
        elif value == '"':
            return None  # a string runs past the window
        elif value in "{[":
            depth += 1
        elif value in "}]":
            depth -= 1
    return None


def _first(chunks: list[bytes], size: int) -> bytes:
    """The first `size` bytes of the chunks joined (copying no more than that)."""
    out, have = [], 0
    for chunk in chunks:
        out.append(chunk[:size - have])
        have += len(out[-1])
        if have >= size:
            break
    return b"".join(out)


def _last(chunks: list[bytes], size: int) -> bytes:
    out, have = [], 0
    for chunk in reversed(chunks):
        out.append(chunk[-(size - have):])
        have += len(out[-1])
        if have >= size:
            break
    return b"".join(reversed(out))


def _choice_chars(document: object) -> int:
    """Characters of the completion text in a parsed chat/completions body."""
    choices = document.get("choices") if isinstance(document, dict) else None
    total = 0
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        parts = [choice.get("text")]
        if isinstance(message, dict):
            parts += [message.get("content"), message.get("reasoning_content")]
            calls = message.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict):
                    parts.append(function.get("arguments"))
        total += sum(len(part) for part in parts if isinstance(part, str))
    return total


class JsonUsage:
    """Feed every chunk (it is sent on unchanged); `result()` once the body is over."""

    __slots__ = ("_chars", "_done", "_head", "_head_size", "_tail", "_tail_size", "_usage",
                 "size")

    def __init__(self) -> None:
        self._head: list[bytes] = []
        self._head_size = 0
        self._tail: deque[bytes] = deque()
        self._tail_size = 0
        self._done = False
        self._usage: Usage | None = None
        self._chars = -1  # not worked out yet
        self.size = 0

    completion_chunks = 0  # a JSON body has no chunks of its own

    def feed(self, chunk: bytes) -> bytes:
        self.size += len(chunk)
        if self._head_size < _HEAD:
            self._head.append(chunk)
            self._head_size += len(chunk)
            return chunk
        tail = self._tail
        tail.append(chunk)
        self._tail_size += len(chunk)
        while self._tail_size - len(tail[0]) >= _TAIL:
            self._tail_size -= len(tail.popleft())
        return chunk

    def finish(self) -> bytes:
        return b""

    def result(self) -> Usage | None:
        if not self._done:
            self._done = True
            self._usage = self._find()
        return self._usage

    @property
    def completion_chars(self) -> int:
        """The completion text's length, for an estimate (worked out on demand, once)."""
        if self._chars < 0:
            if self.size > _WHOLE:
                self._chars = self.size  # too large to parse: most of such a body is its text
            else:
                whole = self._whole()
                try:
                    self._chars = _choice_chars(json.loads(whole))
                except ValueError:
                    self._chars = len(whole)
        return self._chars

    def _whole(self) -> bytes:
        head = self._head[0] if len(self._head) == 1 else b"".join(self._head)
        return head + b"".join(self._tail) if self._tail else head

    def _find(self) -> Usage | None:
        if self.size <= _WHOLE:
            whole = self._whole()
            if _USAGE not in whole:
                return None
            # A body cut off (a broken upstream) is not JSON; its usage may still be there.
            return usage_from_json(whole) or usage_at_end(whole) or usage_at_start(whole)
        chunks = [*self._head, *self._tail]
        return usage_at_end(_last(chunks, _TAIL)) or usage_at_start(_first(chunks, _HEAD))
