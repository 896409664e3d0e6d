"""The usage parsers on every shape, with chunk boundaries at every byte position: SSE streams
(usage event found, removed when the proxy asked for it, nothing else held or changed), JSON
bodies of any size (usage at the end or the start, bounded memory), the request rewrite that
asks for stream usage, and the tokenizer-free estimate."""

from __future__ import annotations

import json
from collections.abc import Iterable

import pytest

from gpuproxy_proxy.metering.estimate import estimate_usage, prompt_tokens
from gpuproxy_proxy.metering.json_tail import JsonUsage
from gpuproxy_proxy.metering.sse_usage import SseUsage
from gpuproxy_proxy.metering.usage import Usage
from gpuproxy_proxy.upstream.stream_options import with_stream_usage

USAGE = {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}


def event(obj: object, sep: bytes = b"\n\n") -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + sep


def content(text: str, sep: bytes = b"\n\n") -> bytes:
    return event({"id": "c1", "object": "chat.completion.chunk",
                  "choices": [{"index": 0, "delta": {"content": text}}]}, sep)


def usage_event(sep: bytes = b"\n\n") -> bytes:
    return event({"id": "c1", "object": "chat.completion.chunk", "choices": [],
                  "usage": USAGE}, sep)


def run(watch: SseUsage, pieces: Iterable[bytes]) -> bytes:
    out = [watch.feed(piece) for piece in pieces]
    out.append(watch.finish())
    return b"".join(out)


def splits(data: bytes) -> Iterable[list[bytes]]:
    """The whole; cut in two at every position; byte by byte."""
    yield [data]
    for i in range(1, len(data)):
        yield [data[:i], data[i:]]
    yield [data[i:i + 1] for i in range(len(data))]


@pytest.mark.parametrize("sep", [b"\n\n", b"\r\n\r\n"])
def test_sse_usage_event_removed_at_every_split(sep: bytes) -> None:
    kept = content("Hel", sep) + content("lo \\\"you\\\"", sep)
    stream = kept + usage_event(sep) + b"data: [DONE]" + sep
    for pieces in splits(stream):
        watch = SseUsage(strip=True)
        assert run(watch, pieces) == kept + b"data: [DONE]" + sep, pieces
        assert watch.result() == Usage(11, 2, 13)
        assert watch.removed == 1
        assert watch.completion_chunks == 2


def test_sse_usage_kept_when_the_client_asked_at_every_split() -> None:
    stream = content("a") + content("b") + usage_event() + b"data: [DONE]\n\n"
    for pieces in splits(stream):
        watch = SseUsage(strip=False)
        out = [watch.feed(piece) for piece in pieces]
        assert out == pieces  # the very same chunks, nothing held
        assert watch.finish() == b""
        assert watch.result() == Usage(11, 2, 13)


def test_sse_openai_style_null_usage_on_every_chunk() -> None:
    nulls = b"".join(event({"choices": [{"delta": {"content": t}}], "usage": None})
                     for t in ("x", "y", "z"))
    stream = nulls + usage_event() + b"data: [DONE]\n\n"
    for pieces in splits(stream):
        watch = SseUsage(strip=True)
        assert run(watch, pieces) == nulls + b"data: [DONE]\n\n"
        assert watch.result() == Usage(11, 2, 13)


def test_sse_first_event_and_content_events_are_never_held() -> None:
    first = content("first")
    watch = SseUsage(strip=True)
    # Half of the first event goes on at once (time to first byte).
    assert watch.feed(first[:10]) == first[:10]
    assert watch.feed(first[10:]) == first[10:]
    # A content chunk cut in two goes on as soon as it shows its choices.
    second = content("second")
    cut = second.index(b'"delta"')
    assert watch.feed(second[:cut]) == second[:cut]
    assert watch.feed(second[cut:]) == second[cut:]
    # An event that may be the usage one waits for its end, then is removed.
    tail = usage_event()
    assert watch.feed(tail[:20]) == b""
    assert watch.feed(tail[20:] + b"data: [DONE]\n\n") == b"data: [DONE]\n\n"
    assert watch.result() == Usage(11, 2, 13)


def test_sse_usage_with_choices_is_not_removed() -> None:
    # Some servers (TGI) put usage on the last content chunk: that chunk is content.
    last = event({"choices": [{"delta": {"content": "!"}, "finish_reason": "stop"}],
                  "usage": USAGE})
    stream = content("a") + last + b"data: [DONE]\n\n"
    watch = SseUsage(strip=True)
    assert run(watch, [stream]) == stream
    assert watch.result() == Usage(11, 2, 13)


def test_sse_usage_event_without_a_final_blank_line() -> None:
    stream = content("a") + usage_event(b"\n")
    for pieces in splits(stream):
        stripped = SseUsage(strip=True)
        assert run(stripped, pieces) == content("a")
        assert stripped.result() == Usage(11, 2, 13)
        kept = SseUsage(strip=False)
        assert run(kept, pieces) == stream
        assert kept.result() == Usage(11, 2, 13)


def test_sse_without_usage_counts_the_completion() -> None:
    texts = ["Hello", " wor", "ld", "", " and a longer piece of text"]
    stream = b"".join(content(t) for t in texts) + b"data: [DONE]\n\n"
    for pieces in splits(stream):
        watch = SseUsage(strip=True)
        assert run(watch, pieces) == stream
        assert watch.result() is None
        assert watch.completion_chunks == 4  # the empty delta carries no text
        assert watch.completion_chars == sum(len(t) for t in texts)
    assert watch.completion_tokens == 10  # 38 characters at 4 per token, rounded up


def test_sse_legacy_completions_and_tool_calls_are_counted() -> None:
    stream = (event({"object": "text_completion", "choices": [{"text": "abcd"}]})
              + event({"choices": [{"delta": {"tool_calls": [
                  {"function": {"arguments": "{\"k\":1}"}}]}}]})
              + event({"choices": [{"delta": {"reasoning_content": "hmm"}}]}))
    watch = SseUsage(strip=False)
    run(watch, [stream])
    assert watch.completion_chunks == 3
    assert watch.completion_chars == 4 + len(b'{\\"k\\":1}') + 3


def test_sse_oversized_event_passes_through() -> None:
    big = content("x" * 200_000)
    stream = content("a") + big + usage_event() + b"data: [DONE]\n\n"
    watch = SseUsage(strip=True)
    pieces = [stream[i:i + 4096] for i in range(0, len(stream), 4096)]
    assert run(watch, pieces) == content("a") + big + b"data: [DONE]\n\n"
    assert watch.result() == Usage(11, 2, 13)


def _body(size: int, usage_first: bool = False) -> bytes:
    """A chat completion of about `size` bytes with usage at its end (or its start)."""
    doc: dict[str, object] = {"id": "x", "object": "chat.completion"}
    if usage_first:
        doc["usage"] = USAGE
    doc["choices"] = [{"index": 0, "message": {"role": "assistant",
                                               "content": "w\\o\"rd " * (size // 9)}}]
    if not usage_first:
        doc["usage"] = USAGE
        doc["system_fingerprint"] = None
    return json.dumps(doc).encode()


def _feed_json(body: bytes, size: int) -> JsonUsage:
    watch = JsonUsage()
    for i in range(0, len(body), size):
        piece = body[i:i + size]
        assert watch.feed(piece) is piece
    return watch


@pytest.mark.parametrize("usage_first", [False, True])
@pytest.mark.parametrize("size", [1, 100, 4096, 65536, 700_000, 10**7])
def test_json_big_body_usage_found_with_bounded_memory(usage_first: bool, size: int) -> None:
    body = _body(1_200_000 if size > 1 else 100_000, usage_first)
    watch = _feed_json(body, size)
    assert watch.result() == Usage(11, 2, 13)
    if size < 65536:  # what is kept: the two windows and at most a chunk more each
        kept = sum(map(len, watch._head)) + sum(map(len, watch._tail))
        assert kept <= 32 * 1024 + 2 * size


def test_json_small_body_at_every_split() -> None:
    for body in (_body(200), _body(200, usage_first=True),
                 b'{"object":"list","data":[{"embedding":[0.1,0.2]}],'
                 b'"usage":{"prompt_tokens":4,"total_tokens":4}}'):
        expected = Usage(4, None, 4) if b"embedding" in body else Usage(11, 2, 13)
        for pieces in splits(body):
            watch = JsonUsage()
            for piece in pieces:
                watch.feed(piece)
            assert watch.result() == expected, pieces


def test_json_nested_or_quoted_usage_is_not_taken() -> None:
    fake = {"prompt_tokens": 999, "completion_tokens": 999, "total_tokens": 1998}
    doc = {"choices": [{"message": {"content": 'say "usage": {"prompt_tokens": 5} ' * 4000},
                        "usage": fake}], "model": "m"}
    body = json.dumps(doc).encode()
    assert len(body) > 100_000
    watch = _feed_json(body, 4096)
    assert watch.result() is None
    assert watch.completion_chars == len(body)  # too large to keep whole: its size counts


def test_json_without_usage_counts_the_completion_text() -> None:
    body = json.dumps({"choices": [{"message": {"content": "x" * 40}},
                                   {"text": "y" * 8}]}).encode()
    watch = _feed_json(body, 7)
    assert watch.result() is None
    assert watch.completion_chars == 48


def test_json_broken_off_body_still_finds_usage() -> None:
    body = _body(300)
    watch = _feed_json(body[:-5], 50)  # cut off after the usage object
    assert watch.result() == Usage(11, 2, 13)


def test_stream_request_asks_for_usage() -> None:
    sent = '{"model":"m","stream":true,"messages":[{"role":"user","content":"h\\u00e9 ✓"}],' \
           '"temperature":0.7,"n":1,"stream_options":{"continuous_usage_stats":false}}'
    body, strip = with_stream_usage(sent.encode())
    assert strip
    forwarded = json.loads(body)
    assert forwarded["stream_options"] == {"continuous_usage_stats": False,
                                           "include_usage": True}
    original = json.loads(sent)
    del forwarded["stream_options"], original["stream_options"]
    assert forwarded == original
    assert list(json.loads(body)) == list(json.loads(sent))  # the order of the fields too
    for options in ('"stream_options":null,', '"stream_options":{"include_usage":false},', ""):
        body, strip = with_stream_usage(("{" + options + '"stream":true}').encode())
        assert strip
        assert json.loads(body)["stream_options"]["include_usage"] is True


def test_stream_request_without_options_keeps_its_bytes() -> None:
    sent = b'  {"model": "m",\n "prompt": "caf\xc3\xa9 \\u00e9", "stream" : true, "n": 1.0}'
    body, strip = with_stream_usage(sent)
    assert strip
    assert body == b'  {"stream_options":{"include_usage":true},' + sent[3:]
    assert json.loads(body) == {**json.loads(sent), "stream_options": {"include_usage": True}}


@pytest.mark.parametrize("body", [
    b'{"stream":true,"stream_options":{"include_usage":true}}',  # the client asked
    b'{"stream": false, "metadata": {"stream": true}}',  # not the top-level key
    b'{"stream":false,"messages":[]}',
    b'{"messages":[]}',
    b'{"stream":true,"stream_options":"bad"}',  # the backend's 400 to give
    b'{"stream": true',  # not JSON
    b'[{"stream":true}]',
])
def test_request_forwarded_as_sent(body: bytes) -> None:
    assert with_stream_usage(body) == (body, False)


def test_request_with_a_lone_surrogate_stays_escaped() -> None:
    body, strip = with_stream_usage(b'{"stream":true,"prompt":"\\ud800"}')
    assert strip
    assert json.loads(body)["prompt"] == "\ud800"


def test_estimate_heuristic() -> None:
    chat = {"messages": [{"role": "user", "content": "x" * 36},
                         {"role": "user", "content": [
                             {"type": "text", "text": "y" * 8},
                             {"type": "image_url", "image_url": {"url": "data:" + "z" * 9999}}]}]}
    # 36 + 8 text characters, the roles and part types (4 + 4 + 4 + 9): 65 -> 17, + 2 * 3.
    assert prompt_tokens("chat_completions", chat) == 17 + 6
    assert prompt_tokens("completions", {"prompt": [1, 2, 3, 4, 5]}) == 5
    assert prompt_tokens("completions", {"prompt": ["abcd", "abcde"]}) == 3
    assert prompt_tokens("embeddings", {"input": [[1, 2], [3]]}) == 3

    class Seen:
        completion_chunks = 3
        completion_chars = 41

    body = json.dumps({"prompt": "abcdefgh", "max_tokens": 100}).encode()
    assert estimate_usage("completions", body, Seen()) == Usage(2, 11, 13, estimated=True)
    capped = json.dumps({"prompt": "abcdefgh", "max_tokens": 5}).encode()
    assert estimate_usage("completions", capped, Seen()) == Usage(2, 5, 7, estimated=True)
    embed = json.dumps({"input": "a" * 17}).encode()
    assert estimate_usage("embeddings", embed, None) == Usage(5, None, 5, estimated=True)
    assert estimate_usage("chat_completions", b"not json!", None) == Usage(
        3, 0, 3, estimated=True)


def test_request_model_is_the_first_model_key_of_the_body() -> None:
    from gpuproxy_proxy.metering.spend import MAX_MODEL_CHARS, request_model

    assert request_model(b'{"model": "gpt-x", "messages": []}') == "gpt-x"
    assert request_model(b'{"messages": [{"role": "model"}], "model":"m\\u00e9"}') == "m\u00e9"
    assert request_model(b'{"messages": []}') is None
    assert request_model(b'{"model": "' + b"x" * (MAX_MODEL_CHARS + 1) + b'"}') is None


def test_spool_lines_carry_model_and_team_to_replays() -> None:
    from gpuproxy_proxy.metering.records import (
        UsageRecord,
        from_settled,
        interrupted,
        new_record_id,
    )

    rec = UsageRecord("r", "api_key", "u", "k", "gpu", "chat_completions", 200,
                      prompt_tokens=1, completion_tokens=2, total_tokens=3, model="m",
                      team="t", record_id=new_record_id())
    back = from_settled(rec.entry())
    assert (back.model, back.team) == ("m", "t")
    admitted = {"t": "a", "id": new_record_id().hex, "ts": 1.0, "rid": "r", "pk": "api_key",
                "u": "u", "k": "k", "r": "chat_completions", "bi": 0, "m": "m", "tm": "t"}
    assert (interrupted(admitted).model, interrupted(admitted).team) == ("m", "t")
    old = {k: v for k, v in admitted.items() if k not in ("m", "tm")}  # an older spool's line
    assert (interrupted(old).model, interrupted(old).team) == (None, None)
