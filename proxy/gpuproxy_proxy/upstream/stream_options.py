"""Exact usage for every stream: a streamed chat/completions request is forwarded with
`stream_options.include_usage: true`, so the backend ends it with a usage event.

When the client did not ask for that event itself, the proxy removes it from what the client
receives (metering/sse_usage.py), so the stream looks as the client asked for it.
"""

from __future__ import annotations

import json

_STREAM = b'"stream"'


def with_stream_usage(body: bytes) -> tuple[bytes, bool]:
    """(the body to forward, whether the usage event is the proxy's to remove).

    A body that is not a streamed request, is not a JSON object, or whose `stream_options` is
    not an object (the backend's 400 to give) is forwarded as sent. Otherwise it is serialized
    once more with every other field as it was."""
    if _STREAM not in body:
        return body, False  # the common non-streamed request: a bytes search, no parsing
    try:
        request = json.loads(body)
    except ValueError:
        return body, False
    if not isinstance(request, dict) or request.get("stream") is not True:
        return body, False
    options = request.get("stream_options")
    if options is None:
        options = {}
    elif not isinstance(options, dict):
        return body, False
    if options.get("include_usage") is True:
        return body, False  # the client asked: its usage event is its own
    request["stream_options"] = {**options, "include_usage": True}
    try:
        text = json.dumps(request, ensure_ascii=False, separators=(",", ":"))
        return text.encode("utf-8"), True
    except UnicodeEncodeError:  # a lone surrogate escape (\ud800) in a string: keep it escaped
        return json.dumps(request, separators=(",", ":")).encode("ascii"), True
