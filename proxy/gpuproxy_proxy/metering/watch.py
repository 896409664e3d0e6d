"""The usage watcher of one response: what forward.py feeds each chunk to, by content type."""

from __future__ import annotations

from typing import Protocol

from gpuproxy_proxy.metering.json_tail import JsonUsage
from gpuproxy_proxy.metering.sse_usage import SseUsage
from gpuproxy_proxy.metering.usage import Usage
from gpuproxy_proxy.upstream.framing import ResponseHead


class UsageWatch(Protocol):
    def feed(self, chunk: bytes) -> bytes:
        """The bytes to send on for `chunk` (the chunk itself, or less: see SseUsage)."""

    def finish(self) -> bytes:
        """At the end of the body: bytes still to send."""

    def result(self) -> Usage | None: ...

    @property
    def completion_chunks(self) -> int: ...

    @property
    def completion_chars(self) -> int: ...


def usage_watch(head: ResponseHead, strip: bool) -> UsageWatch | None:
    """A watcher for an SSE or JSON body, else None. `strip`: remove the usage event the proxy
    asked for on the client's behalf (upstream/stream_options.py)."""
    content_type = head.content_type
    is_sse = content_type.startswith("text/event-stream")
    if not is_sse and "json" not in content_type:
        return None
    for name, value in head.headers:
        # Compressed bytes cannot be read as they pass (and are never held): no usage there.
        if len(name) == 16 and name.lower() == "content-encoding" and \
                value.strip().lower() != "identity":
            return None
    return SseUsage(strip) if is_sse else JsonUsage()
