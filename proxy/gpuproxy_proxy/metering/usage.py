"""Token counts from OpenAI `usage` objects (a JSON body, or the SSE event that carries one).

Finding them in responses of any size is metering/json_tail.py's and metering/sse_usage.py's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

_USAGE = b'"usage"'


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    # Counted by metering/estimate.py because the backend reported no usage.
    estimated: bool = False


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


def has_non_null_usage(data: bytes, start: int = 0, end: int | None = None) -> bool:
    """Whether `data[start:end]` has a `"usage"` key whose value is not null (bytes search)."""
    stop = len(data) if end is None else end
    idx = data.rfind(_USAGE, start, stop)
    while idx != -1:
        rest = data[idx + len(_USAGE): idx + len(_USAGE) + 16].lstrip(b" :\t\r\n")
        if not rest.startswith(b"null"):
            return True
        idx = data.rfind(_USAGE, start, idx)
    return False


def usage_from_json(body: bytes) -> Usage | None:
    """Usage of a complete JSON response body, or None when it has none or is not JSON."""
    if _USAGE not in body:
        return None
    try:
        return usage_from_object(json.loads(body))
    except ValueError:
        return None
