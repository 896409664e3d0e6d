"""Usage in an SSE stream: finds the usage event, removes it when only the proxy asked for it
(upstream/stream_options.py), and keeps a running tokenizer-free count of the streamed text.

Hot path: per chunk a few bytes searches (no regex: one without a literal prefix is tried at
every byte); JSON is parsed only for an event whose `"usage"` is not null. Events pass through
as they arrive; the only bytes ever held back are an incomplete event that may turn out to be
the usage event to remove (never the first event, never over _MAX_EVENT), until its end arrives.
"""

from __future__ import annotations

import json
import re

from gpuproxy_proxy.metering.estimate import completion_tokens_for
from gpuproxy_proxy.metering.usage import Usage, has_non_null_usage, usage_from_object

_USAGE = b'"usage"'
# An incomplete event longer than this is passed on and forgotten: no usage event is this big.
_MAX_EVENT = 64 * 1024
# Keys of completion text in a chunk: delta content (also reasoning_content), legacy
# completions' text, tool-call arguments; the byte before each must be one of its `lead`.
_TEXT_KEYS = ((b'content":', b'"_'), (b'text":', b'"'), (b'arguments":', b'"'))
# Evidence that an incomplete event is a content chunk, not the usage-only one.
_CHOICES_GIVEN = re.compile(rb'"choices"\s*:\s*\[\s*[^\]\s]')


def _event_end(data: bytes, start: int = 0, end: int | None = None) -> int:
    """Index just past the first event boundary in data[start:end], -1 without one."""
    lf = data.find(b"\n\n", start, end)
    crlf = data.find(b"\r\n\r\n", start, end)
    if lf == -1:
        return crlf + 4 if crlf != -1 else -1
    return lf + 2 if crlf == -1 or lf + 2 < crlf + 4 else crlf + 4


def _last_event_end(data: bytes, end: int | None = None) -> int:
    """Index just past the last event boundary in data[:end], 0 without one."""
    if end is None and (data.endswith(b"\n\n") or data.endswith(b"\r\n\r\n")):
        return len(data)  # the usual chunk: whole events
    stop = len(data) if end is None else end
    lf = data.rfind(b"\n\n", 0, stop)
    crlf = data.rfind(b"\r\n\r\n", 0, stop)
    return max(lf + 2 if lf != -1 else 0, crlf + 4 if crlf != -1 else 0)


def _string_end(data: bytes, start: int) -> int:
    """Index of the quote closing the JSON string that starts at `start`, -1 if cut off."""
    end = data.find(b'"', start)
    while end != -1 and data[end - 1] == 0x5C:  # a backslash: escaped unless itself escaped
        slashes = 1
        while end - 1 - slashes >= start and data[end - 1 - slashes] == 0x5C:
            slashes += 1
        if slashes % 2 == 0:
            break
        end = data.find(b'"', end + 1)
    return end


def _without(data: bytes, drops: list[tuple[int, int]], begin: int, end: int) -> bytes:
    """data[begin:end] without the (ordered) spans in `drops`."""
    pieces, pos = [], begin
    for start, stop in drops:
        pieces.append(data[pos:start])
        pos = stop
    pieces.append(data[pos:end])
    return b"".join(pieces)


def _event_object(event: bytes) -> object:
    """The JSON of an event's data lines (joined as SSE says), or None."""
    lines = [line[5:] for line in event.splitlines() if line.startswith(b"data:")]
    try:
        return json.loads(b"\n".join(lines)) if lines else None
    except ValueError:
        return None


class SseUsage:
    """Feed every chunk and send what `feed` returns; `finish()` at the end of the stream."""

    __slots__ = ("_carry", "_carry_sent", "_in_event", "_started", "_strip", "completion_chars",
                 "completion_chunks", "removed", "usage")

    def __init__(self, strip: bool) -> None:
        self._strip = strip
        self._carry = b""  # the incomplete event at the end of what arrived so far
        self._carry_sent = True  # False: _carry is held back, not yet sent
        self._in_event = False  # an incomplete event is under way (its _carry may be dropped)
        self._started = False  # a complete event went by: the first one is never held
        self.usage: Usage | None = None
        self.completion_chunks = 0  # text-bearing deltas so far
        self.completion_chars = 0  # bytes of their JSON-escaped text
        self.removed = 0  # usage events taken out of the stream

    @property
    def completion_tokens(self) -> int:
        """The tokenizer-free count of the completion streamed so far (an interrupted stream)."""
        return completion_tokens_for(self.completion_chunks, self.completion_chars)

    def feed(self, chunk: bytes) -> bytes:
        """What to send on for this chunk (the chunk itself unless something is held/removed)."""
        if not self._carry and (chunk.endswith(b"\n\n") or chunk.endswith(b"\r\n\r\n")):
            # The usual chunk: whole events, nothing carried over.
            self._started, self._in_event = True, False
            self._count(chunk)
            if _USAGE not in chunk or not has_non_null_usage(chunk):
                return chunk
            drops = self._usage_events(chunk, 0, len(chunk), 0)
            return _without(chunk, drops, 0, len(chunk)) if drops else chunk
        return self._feed_split(chunk)

    def _feed_split(self, chunk: bytes) -> bytes:
        """feed() when an event runs across chunks."""
        carry = self._carry
        data = carry + chunk if carry else chunk
        sent = len(carry) if self._carry_sent else 0  # bytes of `data` the client already has
        end = _last_event_end(data)
        # The event under way (no boundary yet) was partly sent: it cannot be removed any more.
        continued = not end and self._in_event and self._carry_sent
        drops: list[tuple[int, int]] = []
        if end:
            self._started = True
            complete = data if end == len(data) else data[:end]
            self._count(complete)
            if _USAGE in complete and has_non_null_usage(complete):
                drops = self._usage_events(data, 0, end, sent)
        stop = len(data)
        rest = len(data) - end
        self._in_event = rest > 0
        if not rest or rest > _MAX_EVENT:
            self._carry, self._carry_sent = b"", True  # sent on and forgotten when too long
        else:
            tail = data[end:] if end else data
            hold = self._may_hold(tail, continued)
            self._carry, self._carry_sent = tail, not hold
            if hold:
                stop = end
        if not drops:
            if stop == len(data):
                return data if sent == 0 else chunk
            return data[sent:stop]
        return _without(data, drops, sent, stop)

    def finish(self) -> bytes:
        """The end of the stream: an event cut off without its blank line still counts (and is
        still removed if it is ours); returns the held bytes to send, if any."""
        carry, held = self._carry, not self._carry_sent
        self._carry, self._carry_sent, self._in_event = b"", True, False
        if not carry:
            return b""
        self._count(carry)
        drops = (self._usage_events(carry, 0, len(carry), 0 if held else len(carry))
                 if _USAGE in carry and has_non_null_usage(carry) else [])
        return b"" if not held or drops else carry

    def result(self) -> Usage | None:
        if self._carry:
            self.finish()  # the stream broke off: what arrived still counts
        return self.usage

    def _count(self, data: bytes) -> None:
        """Count the text-bearing string values in the complete events of `data`."""
        chunks = chars = 0
        size = len(data)
        for key, lead in _TEXT_KEYS:
            idx = data.find(key)
            while idx != -1:
                pos = idx + len(key)
                if pos < size and data[pos] == 0x20:  # `": "` as well as `":"`
                    pos += 1
                if pos < size and data[pos] == 0x22 and data[idx - 1] in lead:
                    end = data.find(b'"', pos + 1)
                    if end != -1 and data[end - 1] == 0x5C:  # an escape before it
                        end = _string_end(data, pos + 1)
                    if end == -1:
                        break
                    if end > pos + 1:
                        chunks += 1
                        chars += end - pos - 1
                    pos = end
                idx = data.find(key, pos)
        if chunks:
            self.completion_chunks += chunks
            self.completion_chars += chars

    def _may_hold(self, tail: bytes, continued: bool) -> bool:
        """Whether the incomplete event `tail` is held back: only when removing the usage
        event, never the first event (TTFB), never one partly sent, never a content chunk."""
        if not self._strip or not self._started or continued:
            return False
        if tail.startswith((b"data: [", b"data:[")):
            return False  # [DONE]
        return _CHOICES_GIVEN.search(tail) is None

    def _usage_events(self, data: bytes, begin: int, end: int,
                      sent: int) -> list[tuple[int, int]]:
        """Parse the events of data[begin:end] with a non-null usage (the last one wins);
        returns the spans to remove: usage-only events the client did not ask for."""
        drops: list[tuple[int, int]] = []
        found: Usage | None = None
        idx = data.rfind(_USAGE, begin, end)
        while idx != -1:
            start = max(_last_event_end(data, idx), begin)
            stop = _event_end(data, idx, end)
            stop = end if stop == -1 else stop
            if has_non_null_usage(data, start, stop):
                obj = _event_object(data[start:stop])
                usage = usage_from_object(obj)
                if usage is not None:
                    found = found or usage
                    choices = obj.get("choices") if isinstance(obj, dict) else None
                    if self._strip and not choices and start >= sent:
                        drops.append((start, stop))
            idx = data.rfind(_USAGE, begin, start) if start > begin else -1
        if found is not None:
            self.usage = found
        self.removed += len(drops)
        drops.reverse()
        return drops
