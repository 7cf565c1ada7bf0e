"""A frozen copy of `cluster.routing.prefix_index` as it was before the replica-bitmask
index (commit 738fbc4): the reference `tests/test_routing_index_equivalence.py` checks
the current index against, decision for decision. Not used by the project itself.

An approximate, per-replica index of the KV blocks each engine replica caches.

What it mirrors. vLLM keeps every full KV block it computed in a hash table until the
block's slot is reused. Blocks of finished requests go to the tail of a free-block queue
(a request's blocks in reverse order, so its deepest blocks sit nearer the head) and new
allocations take the head: eviction is least-recently-used at block granularity, deepest
block first. A replica holds at most `kv_capacity_blocks` distinct blocks.

How it is approximated. A router cannot see the engine; it records what it sent where:
`insert(replica, chain)` marks the whole chain as just used on that replica (deepest
block first, like vLLM's free order), and evicts least-recently-used blocks beyond the
replica's capacity. Because every touch of a block also touches all of its ancestors,
later than it, an ancestor is not evicted before its descendants (short of one
generation's reordering, below): the set a replica holds is prefix-closed, and `match`
finds the longest held prefix by binary search (O(log n) lookups per replica, however
long the prompt).

Blocks in use. vLLM never evicts a block a request still references: a request's
blocks stay resident from its prefill until it finishes, and only then join the LRU
queue. A router that only replays routing order would evict the blocks of a request that
waits or runs for a long time (at saturation, minutes) while the engine still holds them,
and lose exactly the long shared prefixes that are worth most. So a chain can be
*pinned* while its request is in flight (`pin` at routing, `unpin` when it finishes):
pinned blocks count against the replica's capacity but are never evicted; eviction skips
them (a pinned block eviction meets leaves the generation lists, still held, and rejoins
them, as just used, when its last pin goes). When every held block is pinned the set may
exceed capacity until requests finish: the engine then has that much queued work, and a
request sent there now is prefilled after it.

Memory. Per replica, one dict from block hash to a *generation* number, plus one list of
hashes per generation in touch order (eviction walks the oldest list from its head).
A generation is ~`capacity / generations` touches, so the dict's values are shared int
objects and a block costs one dict entry, one 32-byte int and a list slot or two, about
two thirds of an OrderedDict exact LRU (`cluster bench router` measures both). Touches are bulk C-level updates (a
chain's blocks all move to the newest generation), so order is exact between
generations and by first touch within one.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Sequence
from itertools import repeat

DEFAULT_CAPACITY_BLOCKS = 65536
# gen_of value of a pinned block that eviction met: held, in no generation list.
_PINNED = -1


class _ReplicaBlocks:
    """Blocks one replica is believed to hold, in approximate LRU order."""

    __slots__ = ("capacity", "gen_of", "lists", "base_gen", "head", "gen_size", "max_lists", "pinned")

    def __init__(self, capacity: int, generations: int) -> None:
        self.gen_of: dict[int, int] = {}
        # Blocks of requests in flight -> how many of them reference it (never evicted).
        self.pinned: Counter[int] = Counter()
        # lists[k] holds hashes touched in generation base_gen + k, oldest first; an entry
        # is stale when gen_of says the block was touched again later (or evicted).
        self.lists: deque[list[int]] = deque([[]])
        self.base_gen = 0
        self.head = 0  # eviction cursor into lists[0]
        self.capacity = 0
        self.gen_size = 1
        self.max_lists = 2 * generations
        self.set_capacity(capacity, generations)

    def set_capacity(self, capacity: int, generations: int) -> None:
        self.capacity = max(1, capacity)
        self.gen_size = max(16, self.capacity // generations)
        self.max_lists = 2 * generations
        self.evict()

    def touch(self, hashes: Sequence[int]) -> None:
        cur = self.base_gen + len(self.lists) - 1
        # Bulk, at C speed: every block of the chain moves to the current generation, the
        # deepest first in the list so it is evicted before its ancestors. A block already
        # in this generation is listed twice; the first copy to reach the eviction cursor
        # evicts it and the other is skipped as stale.
        cur_list = self.lists[-1]
        cur_list.extend(reversed(hashes))
        self.gen_of.update(zip(hashes, repeat(cur)))
        if len(cur_list) >= self.gen_size:
            self._new_generation()
        self.evict()

    def _new_generation(self) -> None:
        self.lists.append([])
        if len(self.lists) > self.max_lists:
            self._merge_oldest()

    def _merge_oldest(self) -> None:
        """Bound the lists' length when blocks are re-touched without evictions (a hot
        working set smaller than capacity): fold the oldest generation's live blocks into
        the next one, keeping their order ahead of it."""
        oldest = self.lists.popleft()
        g = self.base_gen
        gen_of = self.gen_of
        nxt = g + 1
        live = [h for h in oldest[self.head :] if gen_of.get(h) == g]
        for h in live:
            gen_of[h] = nxt
        self.lists[0][:0] = live
        self.base_gen = nxt
        self.head = 0

    def evict(self) -> None:
        gen_of = self.gen_of
        pinned = self.pinned
        # Pinned blocks are held (pin inserts them), so at most len - pinned can go.
        excess = min(len(gen_of) - self.capacity, len(gen_of) - len(pinned))
        while excess > 0:
            oldest = self.lists[0]
            g = self.base_gen
            pos = self.head
            n = len(oldest)
            while pos < n and excess > 0:
                # Each scanned entry is live (evict it) or stale (re-touched later). A
                # live pinned block leaves the lists (marked _PINNED: still held) and
                # comes back when its last pin goes, so it is scanned once per touch.
                end = min(n, pos + excess)
                for h in oldest[pos:end]:
                    if gen_of.get(h) == g:
                        if pinned and h in pinned:
                            gen_of[h] = _PINNED
                        else:
                            del gen_of[h]
                            excess -= 1
                pos = end
            if pos < n:
                self.head = pos
                return
            self.lists.popleft()
            self.base_gen += 1
            self.head = 0
            if not self.lists:
                self.lists.append([])
                return

    def pin(self, hashes: Sequence[int]) -> None:
        self.pinned.update(hashes)  # C-level counting

    def unpin(self, hashes: Sequence[int]) -> None:
        pinned, gen_of = self.pinned, self.gen_of
        back: list[int] = []  # unpinned blocks taken out of the lists: they rejoin the LRU
        for h in hashes:
            c = pinned.get(h)
            if c is not None:
                if c > 1:
                    pinned[h] = c - 1
                else:
                    pinned.pop(h)  # dict's own pop: Counter's __delitem__ is Python code
                    if gen_of.get(h) == _PINNED:
                        back.append(h)
        if back:
            self.touch(back)

    def discard(self, hashes: Iterable[int]) -> None:
        for h in hashes:
            self.gen_of.pop(h, None)


class PrefixIndex:
    """Which chained block hashes each replica is believed to cache.

    Each replica's set is bounded by its KV capacity in blocks (`set_capacity`, from the
    replica's `kv_capacity_blocks` routing stat; `default_capacity_blocks` until known).
    """

    def __init__(self, default_capacity_blocks: int = DEFAULT_CAPACITY_BLOCKS, generations: int = 32) -> None:
        if generations < 1:
            raise ValueError(f"generations must be >= 1, got {generations}")
        self._default_capacity = max(1, default_capacity_blocks)
        self._generations = generations
        self._replicas: dict[str, _ReplicaBlocks] = {}
        self._exact: set[str] = set()  # replicas whose set follows the engine's events

    def _get(self, replica_id: str) -> _ReplicaBlocks:
        blocks = self._replicas.get(replica_id)
        if blocks is None:
            blocks = self._replicas[replica_id] = _ReplicaBlocks(self._default_capacity, self._generations)
        return blocks

    def set_capacity(self, replica_id: str, capacity_blocks: int) -> None:
        """Bound the replica's set (evicting at once if it shrank); <= 0 means unknown."""
        capacity = capacity_blocks if capacity_blocks > 0 else self._default_capacity
        blocks = self._get(replica_id)
        if blocks.capacity != capacity:
            blocks.set_capacity(capacity, self._generations)

    def capacity(self, replica_id: str) -> int:
        blocks = self._replicas.get(replica_id)
        return blocks.capacity if blocks is not None else self._default_capacity

    def insert(self, replica_id: str, block_hashes: Sequence[int]) -> None:
        """A router's guess: the replica now holds this chain (all of it, prefix included),
        most recently used. Ignored for a replica that follows its engine's events."""
        if block_hashes and replica_id not in self._exact:
            self._get(replica_id).touch(block_hashes)

    def store(self, replica_id: str, block_hashes: Sequence[int]) -> None:
        """The engine reported these blocks stored (KV cache events), parents first."""
        if block_hashes:
            self._get(replica_id).touch(block_hashes)

    def follow_engine(self, replica_id: str, exact: bool = True) -> None:
        """Whether the replica's set comes from its engine's events alone. Either way its
        current set is dropped: guesses are not the engine's, and a replica falling back
        to guesses starts them afresh."""
        self.drop(replica_id)
        if exact:
            self._exact.add(replica_id)
        else:
            self._exact.discard(replica_id)

    def follows_engine(self, replica_id: str) -> bool:
        return replica_id in self._exact

    def pin(self, replica_id: str, block_hashes: Sequence[int]) -> None:
        """A request using this chain is in flight on the replica: the chain is inserted
        (most recently used) and not evicted until `unpin`. A replica that follows its
        engine's events is left alone: the engine reports what it holds, pins included."""
        if block_hashes and replica_id not in self._exact:
            blocks = self._get(replica_id)
            blocks.pin(block_hashes)
            blocks.touch(block_hashes)

    def unpin(self, replica_id: str, block_hashes: Sequence[int]) -> None:
        """The request that pinned this chain finished (or was given up): its blocks may be
        evicted again, in LRU order (insert the held chain to mark it just released)."""
        blocks = self._replicas.get(replica_id)
        if blocks is not None and block_hashes:
            blocks.unpin(block_hashes)

    def pinned_blocks(self, replica_id: str) -> int:
        blocks = self._replicas.get(replica_id)
        return len(blocks.pinned) if blocks is not None else 0

    def remove(self, replica_id: str, block_hashes: Iterable[int]) -> None:
        """The engine reported these blocks evicted (KV cache events)."""
        blocks = self._replicas.get(replica_id)
        if blocks is not None:
            blocks.discard(block_hashes)

    def match(self, replica_id: str, block_hashes: Sequence[int]) -> int:
        """Number of leading blocks of the chain the replica is believed to hold."""
        return self.match_many((replica_id,), block_hashes)[0]

    def match_many(self, replica_ids: Iterable[str], block_hashes: Sequence[int]) -> list[int]:
        """`match` for each replica, in order: the router's hot path. Replicas often hold
        the same prefix (a shared system prompt), so the previous replica's answer is
        tried first: two lookups confirm it, else a binary search narrows from it."""
        n = len(block_hashes)
        if n == 0:
            return [0 for _ in replica_ids]
        first, last = block_hashes[0], block_hashes[n - 1]
        out: list[int] = []
        replicas = self._replicas
        guess = 0  # a previous answer strictly between 0 and n
        for rid in replica_ids:
            blocks = replicas.get(rid)
            if blocks is None:
                out.append(0)
                continue
            held = blocks.gen_of
            if first not in held:
                out.append(0)
                continue
            if last in held:
                out.append(n)
                continue
            # Invariant: block_hashes[lo - 1] held, block_hashes[hi] not held.
            lo, hi = 1, n - 1
            if guess:
                if block_hashes[guess - 1] in held:
                    lo = guess
                    if block_hashes[guess] not in held:
                        out.append(guess)
                        continue
                    lo = guess + 1
                else:
                    hi = guess - 1
            while lo < hi:
                mid = (lo + hi) // 2
                if block_hashes[mid] in held:
                    lo = mid + 1
                else:
                    hi = mid
            out.append(lo)
            guess = lo
        return out

    def num_blocks(self, replica_id: str) -> int:
        blocks = self._replicas.get(replica_id)
        return len(blocks.gen_of) if blocks is not None else 0

    def drop(self, replica_id: str) -> None:
        self._replicas.pop(replica_id, None)

    def retain(self, replica_ids: Iterable[str]) -> None:
        """Forget replicas not in `replica_ids` (they left the pool)."""
        keep = set(replica_ids)
        for rid in [r for r in self._replicas if r not in keep]:
            del self._replicas[rid]
        self._exact &= keep

    def replica_ids(self) -> list[str]:
        return list(self._replicas)

    def __len__(self) -> int:
        return sum(len(b.gen_of) for b in self._replicas.values())


__all__ = ["DEFAULT_CAPACITY_BLOCKS", "PrefixIndex"]
