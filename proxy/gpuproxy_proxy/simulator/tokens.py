"""Tokenizer-free token ids and prefix block hashes, deterministic across processes.

Text splits into whitespace-led words, each cut into pieces of `chars_per_token` characters; a
piece's id is its CRC32. Chat messages render through a fixed template, so a shared system
prompt always yields the same leading tokens and therefore the same leading block hashes.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from typing import Any

_PIECES = re.compile(r"\s*\S+|\s+")
_OUTPUT_WORDS = (" The", " simulated", " engine", " emits", " one", " token", " per", " step", ".")


def tokenize(text: str, chars_per_token: int) -> list[int]:
    """Deterministic token ids for `text` (about one per `chars_per_token` characters)."""
    ids: list[int] = []
    for match in _PIECES.finditer(text):
        piece = match.group()
        for start in range(0, len(piece), chars_per_token):
            ids.append(zlib.crc32(piece[start:start + chars_per_token].encode()))
    return ids


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts; only text parts carry tokens here
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def render_chat(messages: Sequence[Any]) -> str:
    """The prompt text of a chat, in a fixed template ending with the assistant's turn."""
    parts = []
    for message in messages:
        if not isinstance(message, dict):
            raise ValueError("each message must be an object")
        role = str(message.get("role", "user"))
        parts.append(f"<|{role}|>\n{_content_text(message.get('content'))}\n")
    parts.append("<|assistant|>\n")
    return "".join(parts)


def block_hashes(token_ids: Sequence[int], block_size: int, salt: str) -> list[int]:
    """Chained hashes of the full blocks vLLM may serve from cache.

    As in vLLM's automatic prefix caching, block i's hash covers its tokens and block i-1's hash,
    and at least the last prompt token is always computed, so only the first len-1 tokens count.
    The salt (model or LoRA name) keeps different adapters' caches apart.
    """
    parent = zlib.crc32(salt.encode())
    hashes: list[int] = []
    for index in range((len(token_ids) - 1) // block_size):
        parent = hash((parent, *token_ids[index * block_size:(index + 1) * block_size]))
        hashes.append(parent)
    return hashes


def output_piece(index: int) -> str:
    """The text of the index-th generated token."""
    return _OUTPUT_WORDS[index % len(_OUTPUT_WORDS)]
