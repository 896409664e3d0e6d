"""Token counts from OpenAI `usage` objects, in a JSON body or in the SSE chunk that carries it.

The SSE scanner never holds the stream: it does a bytes search per chunk and keeps a copy only
from the complete lines whose `usage` is not null (normally the last event before `[DONE]`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

_USAGE = b'"usage"'
_MAX_TAIL = 64 * 1024


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def usage_from_object(data: object) -> Usage | None:
    if not isinstance(data, dict):
        return None
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt = _int_or_none(usage.get("prompt_tokens"))
    completion = _int_or_none(usage.get("completion_tokens"))
    total = _int_or_none(usage.get("total_tokens"))
    if total is None and prompt is not None:
        total = prompt + (completion or 0)
    if prompt is None and completion is None and total is None:
        return None
    return Usage(prompt, completion, total)


def usage_from_json(body: bytes) -> Usage | None:
    """Usage of a complete JSON response body, or None when it has none or is not JSON."""
    if _USAGE not in body:
        return None
    try:
        return usage_from_object(json.loads(body))
    except ValueError:
        return None


def _has_non_null_usage(chunk: bytes) -> bool:
    idx = chunk.rfind(_USAGE)
    while idx != -1:
        rest = chunk[idx + len(_USAGE): idx + len(_USAGE) + 16].lstrip(b" :\t")
        if not rest.startswith(b"null"):
            return True
        idx = chunk.rfind(_USAGE, 0, idx)
    return False


class SseUsageScanner:
    """Feed every chunk of an SSE stream; `result()` parses the last `data:` line with usage.

    Only complete lines are searched. The common case (events arrive whole) copies nothing:
    a chunk that ends mid-line leaves its tail in `_partial`, joined to the next chunk.
    """

    __slots__ = ("_last", "_partial")

    def __init__(self) -> None:
        self._partial = b""
        self._last = b""

    def feed(self, chunk: bytes) -> None:
        data = self._partial + chunk if self._partial else chunk
        cut = data.rfind(b"\n") + 1
        if cut == len(data):
            complete, self._partial = data, b""
        else:
            complete, partial = data[:cut], data[cut:]
            # A single line this long is not an SSE usage event; do not grow without bound.
            self._partial = partial if len(partial) <= _MAX_TAIL else b""
        if complete and _USAGE in complete and _has_non_null_usage(complete):
            self._last = complete

    def result(self) -> Usage | None:
        found: Usage | None = None
        for block in (self._last, self._partial):
            if _USAGE not in block:
                continue
            for line in block.splitlines():
                line = line.strip()
                if not line.startswith(b"data:") or _USAGE not in line:
                    continue
                try:
                    usage = usage_from_object(json.loads(line[5:]))
                except ValueError:
                    continue
                if usage is not None:
                    found = usage
        return found
