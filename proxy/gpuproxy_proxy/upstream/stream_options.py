"""Exact usage for every stream: a streamed chat/completions request is forwarded with
`stream_options.include_usage: true`, so the backend ends it with a usage event.

When the client did not ask for that event itself, the proxy removes it from what the client
receives (metering/sse_usage.py), so the stream looks as the client asked for it.
"""

from __future__ import annotations

import json

_STREAM = b'"stream"'
_OPTION = b'"stream_options":{"include_usage":true},'
_SPACE = b" \t\r\n"


def _says_stream_true(body: bytes) -> bool:
    """Whether some `"stream"` key is followed by `true` (bytes searches, no parsing): the
    usual non-streamed request has no such key at all."""
    idx = body.find(_STREAM)
    while idx != -1:
        rest = body[idx + len(_STREAM): idx + len(_STREAM) + 16].lstrip(_SPACE)
        if rest.startswith(b":") and rest[1:].lstrip(_SPACE).startswith(b"true"):
            return True
        idx = body.find(_STREAM, idx + len(_STREAM))
    return False


def with_stream_usage(body: bytes) -> tuple[bytes, bool]:
    """(the body to forward, whether the usage event is the proxy's to remove).

    A body that is not a streamed request, is not a JSON object, or whose `stream_options` is
    not an object (the backend's 400 to give) is forwarded as sent. Without `stream_options`
    the option is put in front of the other fields, which stay byte for byte as sent; with
    one, the body is serialized once more with every other field as it was."""
    if not _says_stream_true(body):
        return body, False
    try:
        request = json.loads(body)
    except ValueError:
        return body, False
    if not isinstance(request, dict) or request.get("stream") is not True:
        return body, False
    if "stream_options" not in request:
        start = len(body) - len(body.lstrip(_SPACE))
        if body[start:start + 1] == b"{":  # UTF-8 (json.loads also takes UTF-16/32)
            return body[:start + 1] + _OPTION + body[start + 1:], True
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
