"""KV-cache blocks: allocation, prefix hashing, reference counts and LRU eviction of cached blocks.

The cache itself lives on the ranks; this hands out block ids. With prefix
caching a full block is named by its content: the hash of its tokens chained
with the previous block's hash, so one hash means one whole prefix, wherever it
occurs. Blocks are shared between sequences by reference count; a block whose
last reference goes stays cached (free, but still holding its K/V) until a new
allocation needs it, least recently used first. Blocks that hold no cached
prefix are reused before any cached one.

This module knows block ids and token ids only; the scheduler maps sequences
to blocks.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

BlockHash = bytes

_ROOT = b""  # the "previous hash" of a sequence's first block


def hash_blocks(token_ids: list[int], block_size: int, hashes: list[BlockHash]) -> list[BlockHash]:
    """Extend `hashes` (those of the first blocks of token_ids) to every full block of token_ids."""
    for i in range(len(hashes), len(token_ids) // block_size):
        prev = hashes[-1] if hashes else _ROOT
        tokens = array("q", token_ids[i * block_size : (i + 1) * block_size])
        hashes.append(hashlib.sha256(prev + tokens.tobytes()).digest())
    return hashes


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        # Free blocks in reuse order: uncached ones at the front, then cached ones least recently used first.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[BlockHash, int] = {}  # hash -> the block holding that prefix
        self.block_hash: dict[int, BlockHash] = {}  # the inverse, for eviction

    @property
    def num_free(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        """Fraction of blocks referenced by a sequence (cached-but-free blocks count as free)."""
        return 1.0 - self.num_free / self.num_blocks if self.num_blocks else 0.0

    def lookup(self, hashes: list[BlockHash]) -> list[int]:
        """The cached blocks of the longest cached prefix among `hashes` (claims nothing)."""
        blocks = []
        if self.enable_prefix_caching:
            for h in hashes:
                block = self.cached.get(h)
                if block is None:
                    break
                blocks.append(block)
        return blocks

    def claim(self, blocks: list[int]) -> None:
        """Take a reference to blocks found by lookup (a cached-but-free one stops being evictable)."""
        for block in blocks:
            if self.ref_count[block] == 0:
                del self.free[block]
            self.ref_count[block] += 1

    def allocate(self, n: int) -> list[int] | None:
        """n fresh blocks, evicting least recently used cached ones as needed; None (and no change) if there are
        fewer than n free."""
        if n > len(self.free):
            return None
        blocks = []
        for _ in range(n):
            block, _ = self.free.popitem(last=False)
            self.forget(block)  # evicted: its content is about to be overwritten
            self.ref_count[block] = 1
            blocks.append(block)
        return blocks

    def release(self, blocks: list[int]) -> None:
        """Drop a reference to each block. Unreferenced cached blocks become evictable, the last of a sequence
        first (a shared prefix outlives its tails); unreferenced uncached blocks are reused first."""
        for block in reversed(blocks):
            self.ref_count[block] -= 1
            assert self.ref_count[block] >= 0, f"block {block} released more often than claimed"
            if self.ref_count[block] == 0:
                self.free[block] = None
                if block not in self.block_hash:
                    self.free.move_to_end(block, last=False)

    def forget(self, block: int) -> None:
        """`block` no longer holds the prefix it was named by (evicted, or the step computing it was lost): no lookup
        finds it."""
        h = self.block_hash.pop(block, None)
        if h is not None:
            del self.cached[h]

    def cache_block(self, block: int, h: BlockHash) -> None:
        """Block `block` holds (or a step in flight is writing) the prefix named `h`: later lookups may share it.
        If another block already holds that prefix, this one stays uncached."""
        if self.enable_prefix_caching and h not in self.cached and block not in self.block_hash:
            self.cached[h] = block
            self.block_hash[block] = h
