"""A fixed-size KV cache of blocks with reference counts and an LRU of reusable prefix blocks.

Mirrors vLLM's block pool: a block freed by a finished sequence keeps its prefix hash and sits
in the free queue (least recently freed first); a later request with the same hash chain takes
it back (a hit), and allocation evicts from the front of the queue when space is needed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Allocation:
    """Blocks held by one sequence; the first `hit_blocks` came from the prefix cache."""

    blocks: tuple[int, ...]
    hit_blocks: int


class KVCache:
    """Block accounting only (no tensors): who holds which block, which hashes are cached."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref_counts = [0] * num_blocks
        self._hash_of_block: dict[int, int] = {}
        self._block_of_hash: dict[int, int] = {}
        # Free blocks, front = evicted first. Cached (hashed) free blocks are still in here.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.evictions = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks holding a reusable prefix hash, in use or free."""
        return len(self._block_of_hash)

    @property
    def usage(self) -> float:
        """vLLM's `kv_cache_usage_perc`: 1 - free/total (free cached blocks count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    def cached_prefix(self, hashes: Sequence[int]) -> list[int]:
        """Blocks of the longest cached prefix of a hash chain."""
        blocks = []
        for block_hash in hashes:
            block = self._block_of_hash.get(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def allocate(self, hashes: Sequence[int], total_blocks: int) -> Allocation | None:
        """Takes `total_blocks` reusing its cached prefix; None if they do not fit."""
        hits = self.cached_prefix(hashes)
        needed = total_blocks - len(hits)
        reusable_free = sum(1 for block in hits if self._ref_counts[block] == 0)
        if needed > len(self._free) - reusable_free:
            return None
        for block in hits:
            if self._ref_counts[block] == 0:
                del self._free[block]
            self._ref_counts[block] += 1
        fresh = [self._take_free_block() for _ in range(needed)]
        for block, block_hash in zip(fresh, hashes[len(hits):], strict=False):
            if block_hash not in self._block_of_hash:
                self._hash_of_block[block] = block_hash
                self._block_of_hash[block_hash] = block
        return Allocation(blocks=(*hits, *fresh), hit_blocks=len(hits))

    def free(self, blocks: Sequence[int]) -> None:
        """Releases a sequence's blocks; tail blocks are queued first so they are evicted first."""
        for block in reversed(blocks):
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free[block] = None

    def _take_free_block(self) -> int:
        block, _ = self._free.popitem(last=False)
        old_hash = self._hash_of_block.pop(block, None)
        if old_hash is not None:
            del self._block_of_hash[old_hash]
            self.evictions += 1
        self._ref_counts[block] = 1
        return block
