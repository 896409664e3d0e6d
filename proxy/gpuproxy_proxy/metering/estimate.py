"""Tokenizer-free token counts for a response whose backend reported no `usage`; the record
is flagged `estimated`.

The heuristic (no tokenizer: the proxy does not know the model's): about 4 characters per token,
OpenAI's rule of thumb for English text, rounded up.
- prompt: the characters of every string in `messages` (images, audio and files left out) and
  `tools`, plus 3 tokens per message for its role and chat template; `prompt` / `input` as text,
  or as token ids (counted exactly, one per id);
- completion: the text seen in the response (streamed deltas, or the JSON body's choices), and a
  stream counts at least one token per text-bearing chunk; a JSON body too large to keep whole
  counts its size; capped by `max_tokens` (times `n`) when the request set one; 0 for embeddings.
"""

from __future__ import annotations

import json
from typing import Protocol

from gpuproxy_proxy.metering.usage import Usage

CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD_TOKENS = 3
# Parts of a message that are not text; their size says nothing about their tokens.
_NOT_TEXT = frozenset({"image_url", "input_audio", "file", "video_url", "audio_url"})


class CompletionText(Protocol):
    """What a response watcher counted (metering/sse_usage.py, metering/json_tail.py)."""

    @property
    def completion_chunks(self) -> int: ...

    @property
    def completion_chars(self) -> int: ...


def tokens_for_chars(chars: int) -> int:
    return -(-chars // CHARS_PER_TOKEN)


def completion_tokens_for(chunks: int, chars: int) -> int:
    """A stream's completion so far: a chunk carries at least one token."""
    return max(chunks, tokens_for_chars(chars))


def _text_chars(value: object) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_text_chars(item) for item in value)
    if isinstance(value, dict):
        return sum(_text_chars(item) for key, item in value.items() if key not in _NOT_TEXT)
    return 0


def _ids_or_text(value: object) -> int:
    """`prompt` / `input`: a string, strings, token ids, or lists of token ids."""
    if isinstance(value, str):
        return tokens_for_chars(len(value))
    if isinstance(value, int) and not isinstance(value, bool):
        return 1  # one token id
    if isinstance(value, list):
        return sum(_ids_or_text(item) for item in value)
    return 0


def prompt_tokens(route: str, request: object) -> int:
    if not isinstance(request, dict):
        return 0
    if route == "chat_completions":
        messages = request.get("messages")
        count = len(messages) if isinstance(messages, list) else 0
        chars = _text_chars(messages) + _text_chars(request.get("tools"))
        return tokens_for_chars(chars) + MESSAGE_OVERHEAD_TOKENS * count
    return _ids_or_text(request.get("prompt" if route == "completions" else "input"))


def _completion_cap(request: object) -> int | None:
    if not isinstance(request, dict):
        return None
    limit = request.get("max_completion_tokens") or request.get("max_tokens")
    n = request.get("n") or 1
    if isinstance(limit, int) and isinstance(n, int) and limit > 0 and n > 0:
        return limit * n
    return None


def estimate_usage(route: str, body: bytes, seen: CompletionText | None) -> Usage:
    """The estimated usage of one request (its forwarded body) and what its response showed."""
    try:
        request = json.loads(body) if body else None
    except ValueError:
        request = None
    prompt = prompt_tokens(route, request) if request is not None else tokens_for_chars(
        len(body))
    completion = 0
    if route != "embeddings" and seen is not None:
        completion = completion_tokens_for(seen.completion_chunks, seen.completion_chars)
        cap = _completion_cap(request)
        if cap is not None:
            completion = min(completion, cap)
    if route == "embeddings":
        return Usage(prompt, None, prompt, estimated=True)
    return Usage(prompt, completion, prompt + completion, estimated=True)
