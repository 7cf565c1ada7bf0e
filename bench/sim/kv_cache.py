"""Paged KV cache of one simulated engine replica, with vLLM's block-level prefix cache.

Blocks are either private to a sequence (being written, or a copy) or *hashed*: they
hold the content of a chained block hash and any sequence whose prompt starts with the
same chain can share them (reference counted). A hashed block whose last reference is
released stays resident and evictable; allocation takes never-used blocks first, then
evicts the least recently released hashed block, as vLLM's free-block queue does (a
finished sequence's blocks are released tail first, so its tail is evicted first).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class PrefixKVCache:
    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks < 1:
            raise ValueError(f"KV capacity must be at least one block, got {capacity_blocks}")
        self.capacity = capacity_blocks
        self.refs: dict[int, int] = {}  # resident hashed blocks -> reference count
        self.evictable: OrderedDict[int, None] = OrderedDict()  # refs == 0, least recent first
        self.free_uncached = capacity_blocks
        self.evictions = 0

    def available(self) -> int:
        """Blocks an allocation can get: free ones plus evictable cached ones."""
        return self.free_uncached + len(self.evictable)

    def usage(self) -> float:
        """Fraction of blocks referenced by sequences (vLLM's kv_cache_usage)."""
        return 1.0 - self.available() / self.capacity

    def match(self, hashes: Sequence[int]) -> int:
        """Number of leading blocks of `hashes` resident in the cache."""
        refs = self.refs
        n = 0
        for h in hashes:
            if h not in refs:
                break
            n += 1
        return n

    def evictable_count(self, hashes: Sequence[int]) -> int:
        """How many of these resident blocks are unreferenced (taking them uses free space)."""
        refs = self.refs
        return sum(1 for h in hashes if refs[h] == 0)

    def acquire(self, hashes: Sequence[int]) -> None:
        """Reference resident blocks (a prefix hit)."""
        refs, evictable = self.refs, self.evictable
        for h in hashes:
            if refs[h] == 0:
                del evictable[h]
            refs[h] += 1

    def allocate(self, n: int) -> bool:
        """Take n private blocks, evicting LRU cached blocks if needed; all or nothing."""
        if n <= 0:
            return True
        if n > self.free_uncached + len(self.evictable):
            return False
        take = min(n, self.free_uncached)
        self.free_uncached -= take
        evictable, refs = self.evictable, self.refs
        for _ in range(n - take):
            h, _ = evictable.popitem(last=False)
            del refs[h]
            self.evictions += 1
        return True

    def register(self, h: int) -> bool:
        """A private block now holds hash h's content: make it shareable. False when h
        is already resident (another sequence computed it too); the block stays private."""
        if h in self.refs:
            return False
        self.refs[h] = 1
        return True

    def release(self, hashes: Sequence[int], private: int) -> None:
        """A sequence lets go of its hashed blocks (in block order) and private blocks."""
        refs, evictable = self.refs, self.evictable
        for h in reversed(hashes):
            c = refs[h] - 1
            refs[h] = c
            if c == 0:
                evictable[h] = None
        self.free_uncached += private

    def check(self, private_in_use: int) -> None:
        """Invariant for tests: every block is free, hashed-resident or private to someone."""
        total = self.free_uncached + len(self.refs) + private_in_use
        if total != self.capacity:
            raise AssertionError(f"KV blocks leak: {total} accounted of {self.capacity}")
        if sum(1 for c in self.refs.values() if c == 0) != len(self.evictable):
            raise AssertionError("evictable set out of sync with reference counts")
