"""An approximate, per-replica index of the KV blocks each engine replica caches.

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
finds the longest held prefix by binary search, however long the prompt.

The decision path. At 64 replicas and 1M blocks a lookup in a replica's own (large,
cold) dict is a cache miss, and one per replica per probed block was most of a routing
decision. So from `MASK_REPLICAS` (16) replicas on, one shared dict maps each block to
the bitmask of the replicas holding it, and `match_many` binary-searches the candidates
all at once (replicas agreeing at a probe share the next one): O(distinct answers x
log n) lookups per request, with answers exactly those of one search per replica. The
answers come out as a few groups of replicas, placed in the candidate list per group
(the largest by one comprehension, the few others one by one), not bit by bit, and the
former search's previous-answer-first probing is checked per pair of answers, not per
replica: on the latency benchmark's workload (64 replicas) a lookup went from ~32 to
~24 us (p50), most of the rest being the ~10-25 cold probes of the shared dict. Keeping
the masks costs a second cold lookup per block stored or evicted, about +60 us per
update at 1M blocks, which fewer replicas do not win back. And the chosen replica's
update (`insert`, `pin`) is queued and applied by `flush`, which the live router runs
after it has sent the request (every other method flushes first, so answers are as if
it had been applied at once).

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
two thirds of an OrderedDict exact LRU (`cluster bench router` measures both). The
shared masks add one entry per distinct block (a block one replica holds shares that
replica's bit object): about 120 bytes per block when no two replicas share one, as the
OrderedDict; shared prefixes cost less.
Touches are bulk C-level updates (a chain's blocks all move to the newest generation),
so order is exact between generations and by first touch within one.
"""

from __future__ import annotations

import heapq
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from itertools import accumulate, compress, filterfalse, repeat
from operator import ne, not_, or_, xor

from cluster.routing.compiled import extension, use_compiled

DEFAULT_CAPACITY_BLOCKS = 65536
# gen_of value of a pinned block that eviction met: held, in no generation list.
_PINNED = -1
# Queued guesses beyond this are applied at once: a caller that never reads still has a
# bounded queue.
_MAX_PENDING = 64
# From this many replicas on the index keeps the shared masks (below, per-replica searches
# cost as little and the masks' upkeep would double the cost of an update).
MASK_REPLICAS = 16
# match_many places at most this many replicas one by one next to its largest group.
_FEW = 8


MatchFn = Callable[[dict[int, int], list[int], Sequence[int]], list[int]]
# `_prefix_match.match_masks` where it was built: the same answers as `match_many`'s grouped
# search, for candidate bits below 2**64 (tests/test_routing_index_equivalence.py runs both).
_compiled_module = extension("_prefix_match")
match_masks_c: MatchFn | None = _compiled_module.match_masks if _compiled_module is not None else None
_match_masks: MatchFn | None = match_masks_c if use_compiled() else None


class _ReplicaBlocks:
    """Blocks one replica is believed to hold, in approximate LRU order."""

    __slots__ = ("capacity", "gen_of", "lists", "base_gen", "head", "gen_size", "max_lists", "pinned", "bit", "masks")

    def __init__(self, capacity: int, generations: int, bit: int, masks: dict[int, int] | None) -> None:
        self.gen_of: dict[int, int] = {}
        # This replica's bit in the index's shared hash -> replicas-holding-it mask (None
        # while the index keeps none), kept equal to membership in gen_of.
        self.bit = bit
        self.masks = masks
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
        gen_of = self.gen_of
        masks = self.masks
        new = list(filterfalse(gen_of.__contains__, hashes)) if masks is not None else None  # warms gen_of
        if new and masks is not None:
            bit = self.bit
            # One probe per block: a block no replica held gets `bit` itself (the one int
            # object, shared: most blocks, 36 bytes each otherwise); the others (whose
            # mask lacks `bit`, so differs from it) get their mask with `bit` added.
            was = list(map(masks.setdefault, new, repeat(bit)))
            others = list(map(ne, was, repeat(bit)))
            if any(others):
                masks.update(zip(compress(new, others), map(or_, compress(was, others), repeat(bit)), strict=False))
        gen_of.update(zip(hashes, repeat(cur)))
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
        gone: list[int] = []
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
                            gone.append(h)
                            excess -= 1
                pos = end
            if pos < n:
                self.head = pos
                break
            self.lists.popleft()
            self.base_gen += 1
            self.head = 0
            if not self.lists:
                self.lists.append([])
                break
        if gone and self.masks is not None:
            self._unmask(gone)

    def _unmask(self, gone: list[int]) -> None:
        """Take this replica's bit out of the masks of blocks it no longer holds: at C
        speed, the blocks no replica holds leave the masks."""
        masks = self.masks
        assert masks is not None
        left = list(map(xor, map(masks.__getitem__, gone), repeat(self.bit)))
        masks.update(zip(gone, left, strict=True))
        deque(map(masks.__delitem__, compress(gone, map(not_, left))), 0)

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
        gen_of = self.gen_of
        gone = [h for h in hashes if gen_of.pop(h, None) is not None]
        if gone and self.masks is not None:
            self._unmask(gone)

    def clear(self) -> None:
        """Forget every block (the replica leaves the index): its bit leaves the masks."""
        self.discard(list(self.gen_of))


class _Bits:
    """A candidate list's replica bits, for `match_many`: each replica's bit (0: not in the
    index), their union, each bit's place in the list (None if a replica is listed twice)
    and prefix[j], the union of the bits before place j."""

    __slots__ = ("ids", "bits", "candidates", "position", "prefix")

    def __init__(self, ids: list[str], bits: list[int]) -> None:
        self.ids = ids
        self.bits = bits
        self.prefix = [0, *accumulate(bits, or_)]
        self.candidates = self.prefix[-1]
        position: dict[int, int] | None = {b: j for j, b in enumerate(bits) if b}
        if position is not None and len(position) != len(bits) - bits.count(0):
            position = None
        self.position = position


_NO_BITS = _Bits([], [])


class PrefixIndex:
    """Which chained block hashes each replica is believed to cache.

    Each replica's set is bounded by its KV capacity in blocks (`set_capacity`, from the
    replica's `kv_capacity_blocks` routing stat; `default_capacity_blocks` until known).

    From `mask_replicas` replicas on, besides each replica's own LRU, one shared dict maps
    a block hash to the bitmask of the replicas holding it, so `match_many` probes each
    block once for all replicas (the per-replica dicts are large and cold: one lookup per
    replica per probed block was most of a decision at 64 replicas).

    `insert` and `pin` (the router's guesses, made on the decision path) are queued and
    applied by `flush`, which the router runs after it has returned its choice; every
    other method flushes first, so the index always answers as if they were applied.
    """

    def __init__(
        self,
        default_capacity_blocks: int = DEFAULT_CAPACITY_BLOCKS,
        generations: int = 32,
        mask_replicas: int = MASK_REPLICAS,
    ) -> None:
        if generations < 1:
            raise ValueError(f"generations must be >= 1, got {generations}")
        self._default_capacity = max(1, default_capacity_blocks)
        self._generations = generations
        self._replicas: dict[str, _ReplicaBlocks] = {}
        self._exact: set[str] = set()  # replicas whose set follows the engine's events
        # block hash -> OR of the bits of replicas holding it; kept from `mask_replicas`
        # replicas on (below that the per-replica searches are as cheap, and upkeep is not).
        self._masks: dict[int, int] | None = None
        self._mask_replicas = mask_replicas
        self._free_bits: list[int] = []  # bit numbers of dropped replicas, for reuse (a heap)
        self._next_bit = 0
        # Queued guesses: (replica, chain, pinned), applied in order by flush().
        self._pending: list[tuple[str, Sequence[int], bool]] = []
        # The last candidate list, its replicas' bits and what match_many derives from them (_Bits).
        self._bits_cache = _NO_BITS  # the last candidate list's bits

    def _get(self, replica_id: str) -> _ReplicaBlocks:
        blocks = self._replicas.get(replica_id)
        if blocks is None:
            if self._free_bits:
                bit = heapq.heappop(self._free_bits)  # the lowest: masks stay small ints
            else:
                bit, self._next_bit = self._next_bit, self._next_bit + 1
            blocks = _ReplicaBlocks(self._default_capacity, self._generations, 1 << bit, self._masks)
            self._replicas[replica_id] = blocks
            self._bits_cache = _NO_BITS
            if self._masks is None and len(self._replicas) >= self._mask_replicas:
                self._build_masks()
        return blocks

    def _build_masks(self) -> None:
        """Start keeping the masks (once: a pool that shrinks back keeps them)."""
        masks: dict[int, int] = {}
        for blocks in self._replicas.values():
            blocks.masks = masks
            held = list(blocks.gen_of)
            was = list(map(masks.setdefault, held, repeat(blocks.bit)))
            others = list(map(ne, was, repeat(blocks.bit)))
            masks.update(zip(compress(held, others), map(or_, compress(was, others), repeat(blocks.bit)), strict=False))
        self._masks = masks

    def flush(self) -> None:
        """Apply the queued `insert`s and `pin`s (the index maintenance a decision leaves)."""
        pending = self._pending
        if not pending:
            return
        self._pending = []
        for replica_id, block_hashes, pinned in pending:
            if replica_id in self._exact:
                continue
            blocks = self._get(replica_id)
            if pinned:
                blocks.pin(block_hashes)
            blocks.touch(block_hashes)

    def set_capacity(self, replica_id: str, capacity_blocks: int) -> None:
        """Bound the replica's set (evicting at once if it shrank); <= 0 means unknown."""
        if self._pending:
            self.flush()
        capacity = capacity_blocks if capacity_blocks > 0 else self._default_capacity
        blocks = self._get(replica_id)
        if blocks.capacity != capacity:
            blocks.set_capacity(capacity, self._generations)

    def capacity(self, replica_id: str) -> int:
        if self._pending:
            self.flush()
        blocks = self._replicas.get(replica_id)
        return blocks.capacity if blocks is not None else self._default_capacity

    def insert(self, replica_id: str, block_hashes: Sequence[int]) -> None:
        """A router's guess: the replica now holds this chain (all of it, prefix included),
        most recently used. Ignored for a replica that follows its engine's events.
        Queued until `flush` (the chain must not change meanwhile)."""
        if block_hashes:
            self._pending.append((replica_id, block_hashes, False))
            if len(self._pending) >= _MAX_PENDING:
                self.flush()

    def store(self, replica_id: str, block_hashes: Sequence[int]) -> None:
        """The engine reported these blocks stored (KV cache events), parents first."""
        if self._pending:
            self.flush()
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
        engine's events is left alone: the engine reports what it holds, pins included.
        Queued until `flush`, like `insert`."""
        if block_hashes:
            self._pending.append((replica_id, block_hashes, True))
            if len(self._pending) >= _MAX_PENDING:
                self.flush()

    def unpin(self, replica_id: str, block_hashes: Sequence[int]) -> None:
        """The request that pinned this chain finished (or was given up): its blocks may be
        evicted again, in LRU order (insert the held chain to mark it just released)."""
        if self._pending:
            self.flush()
        blocks = self._replicas.get(replica_id)
        if blocks is not None and block_hashes:
            blocks.unpin(block_hashes)

    def pinned_blocks(self, replica_id: str) -> int:
        if self._pending:
            self.flush()
        blocks = self._replicas.get(replica_id)
        return len(blocks.pinned) if blocks is not None else 0

    def remove(self, replica_id: str, block_hashes: Iterable[int]) -> None:
        """The engine reported these blocks evicted (KV cache events)."""
        if self._pending:
            self.flush()
        blocks = self._replicas.get(replica_id)
        if blocks is not None:
            blocks.discard(block_hashes)

    def match(self, replica_id: str, block_hashes: Sequence[int]) -> int:
        """Number of leading blocks of the chain the replica is believed to hold."""
        return self.match_many((replica_id,), block_hashes)[0]

    def _bits(self, ids: list[str]) -> _Bits:
        """The replicas' bits, in order, and what `match_many` derives from them."""
        cached = self._bits_cache
        if ids != cached.ids:  # one C-level compare: the candidate list rarely changes
            replicas = self._replicas
            bits = [b.bit if (b := replicas.get(rid)) is not None else 0 for rid in ids]
            cached = self._bits_cache = _Bits(list(ids), bits)
        return cached

    def match_many(self, replica_ids: Iterable[str], block_hashes: Sequence[int]) -> list[int]:
        """`match` for each replica, in order: the router's hot path.

        Each replica's answer is what a binary search for its longest held prefix finds
        (exact where its set is prefix-closed on this chain, the rule but for rare
        reorderings), trying the previous replica's answer first, as when every replica
        had only its own dict. With the masks all replicas are searched at once: replicas that
        agree at a probed block share the next probe, and one lookup in the shared masks
        answers it for all of them, so a request costs O(distinct answers x log n)
        lookups instead of O(replicas x log n). Where `_prefix_match.c` was built and the
        candidates' bits fit in 64, it runs the per-replica searches themselves, compiled,
        with each block's mask looked up once (the same answers)."""
        if self._pending:
            self.flush()
        ids = replica_ids if isinstance(replica_ids, list) else list(replica_ids)
        if self._masks is None:
            return self._match_each(ids, block_hashes)
        n = len(block_hashes)
        get = self._masks.get
        cached = self._bits(ids)
        if _match_masks is not None and not cached.candidates >> 64:
            return _match_masks(self._masks, cached.bits, block_hashes)
        # Only the candidates are searched: each bit's probes depend on its own answers
        # alone, so leaving out the other replicas' bits changes no candidate's answer.
        m0 = get(block_hashes[0], 0) & cached.candidates if n else 0
        if not m0:
            return [0] * len(ids)
        mlast = get(block_hashes[n - 1], 0)
        seen = {0: m0, n - 1: mlast}  # block -> mask, for the blocks looked up
        found: dict[int, int] = {}  # answer strictly inside (0, n) -> the bits with it
        # Binary search (block lo - 1 held, block hi not held) for those that hold the
        # first block but not the last, as sets; those holding both answer n, as before.
        todo = [(1, n - 1, m0 & ~mlast)] if m0 & ~mlast else []
        while todo:
            lo, hi, group = todo.pop()
            if lo >= hi:
                found[lo] = group
                continue
            mid = (lo + hi) // 2
            m = seen.get(mid)
            if m is None:
                m = seen[mid] = get(block_hashes[mid], 0)
            held = group & m
            if held:
                todo.append((mid + 1, hi, held))
            if held != group:
                todo.append((lo, mid, group ^ held))
        holders = m0 & mlast
        groups = [(n, holders), *found.items()] if holders else list(found.items())
        # Most requests: one large group (the holders of a shared prefix) and a few
        # replicas with answers of their own (a conversation's holder). The large one is
        # answered by one comprehension, the few placed by position, not bit by bit (a
        # 64-bit mask's bits one at a time were a third of a lookup).
        big = max(groups, key=_size)
        bits, position = cached.bits, cached.position
        a, g = big
        out = [a if b & g else 0 for b in bits]
        if len(groups) == 1:
            return out
        few = [ag for ag in groups if ag is not big]
        if position is None or sum(map(_size, few)) > _FEW:
            out = _answers_by_bit(groups, bits)
            return self._check_guesses(out, bits, n, seen, get, block_hashes) if len(found) > 1 else out
        placed = []
        for a, g in few:
            while g:
                low = g & -g
                j = position[low]
                out[j] = a
                placed.append((j, a))
                g ^= low
        if len(found) > 1:
            # The former search tried the previous inside answer first: where the answer
            # changes along the replicas, `_check_guesses` may redo a replica's search.
            # Skipped when no replica of a group can fail against the answer before it.
            placed.sort()
            for a, guess in _changes(placed, big, n, cached.prefix):
                if _may_fail(a, found[a], guess, n, seen, get, block_hashes):
                    return self._check_guesses(out, bits, n, seen, get, block_hashes)
        return out

    @staticmethod
    def _check_guesses(
        out: list[int],
        bits: list[int],
        n: int,
        seen: dict[int, int],
        get: Callable[[int, int], int],
        block_hashes: Sequence[int],
    ) -> list[int]:
        """The former search tried the previous answer g (strictly in (0, n)) first; for
        a replica whose answer a differs, check that the blocks that search would probe
        agree with "held iff before a", else redo its search."""
        guess = 0
        checks: dict[tuple[int, int], tuple[int, int]] = {}
        for j, a in enumerate(out):
            if 0 < a < n:
                if guess and a != guess:
                    key = (a, guess)
                    check = checks.get(key)
                    if check is None:
                        check = checks[key] = _probe_masks(a, guess, n, seen, get, block_hashes)
                    b = bits[j]
                    if not (b & check[0]) or b & check[1]:
                        out[j] = a = _search(seen, get, block_hashes, b, n, guess)
                guess = a
        return out

    def _match_each(self, replica_ids: list[str], block_hashes: Sequence[int]) -> list[int]:
        """match_many without masks: each replica's own dict, binary search. Replicas often
        hold the same prefix (a shared system prompt), so the previous replica's answer is
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
        if self._pending:
            self.flush()
        blocks = self._replicas.get(replica_id)
        return len(blocks.gen_of) if blocks is not None else 0

    def drop(self, replica_id: str) -> None:
        if self._pending:
            self.flush()
        blocks = self._replicas.pop(replica_id, None)
        if blocks is not None:
            if blocks.masks is not None:
                blocks.clear()  # its bit leaves the masks before another replica reuses it
            heapq.heappush(self._free_bits, blocks.bit.bit_length() - 1)
            self._bits_cache = _NO_BITS

    def retain(self, replica_ids: Iterable[str]) -> None:
        """Forget replicas not in `replica_ids` (they left the pool)."""
        if self._pending:
            self.flush()
        keep = set(replica_ids)
        for rid in [r for r in self._replicas if r not in keep]:
            self.drop(rid)
        self._exact &= keep

    def replica_ids(self) -> list[str]:
        if self._pending:
            self.flush()
        return list(self._replicas)

    def __len__(self) -> int:
        if self._pending:
            self.flush()
        return sum(len(b.gen_of) for b in self._replicas.values())


def _size(group: tuple[int, int]) -> int:
    return group[1].bit_count()


def _may_fail(
    a: int,
    group: int,
    guess: int,
    n: int,
    seen: dict[int, int],
    get: Callable[[int, int], int],
    block_hashes: Sequence[int],
) -> bool:
    """Whether a replica of `group` (answer `a`) could be answered otherwise by the former
    search trying `guess` first."""
    before, after = _probe_masks(a, guess, n, seen, get, block_hashes)
    return bool(group & ~(before & ~after))


def _changes(placed: list[tuple[int, int]], big: tuple[int, int], n: int, prefix: list[int]) -> set[tuple[int, int]]:
    """The (answer, previous answer) pairs where the answers strictly inside (0, n) change
    along the replicas: `placed` are the few replicas' (position, answer), in order, the
    others answer `big`'s; prefix[j] is the union of the bits of replicas before j."""
    big_a, big_g = big
    big_inside = big_a < n
    pairs = set()
    prev = 0  # the last inside answer so far
    start = 0  # the large group's replicas before `start` are accounted for
    for j, a in placed:
        if big_inside and (prefix[j] ^ prefix[start]) & big_g:  # one of them in [start, j)
            if prev and prev != big_a:
                pairs.add((big_a, prev))
            prev = big_a
        start = j + 1
        if a < n:
            if prev and prev != a:
                pairs.add((a, prev))
            prev = a
    if big_inside and prev and prev != big_a and (prefix[-1] ^ prefix[start]) & big_g:
        pairs.add((big_a, prev))
    return pairs


def _answers_by_bit(groups: list[tuple[int, int]], bits: list[int]) -> list[int]:
    """Each replica's answer from disjoint (answer, bits) groups, one bit at a time."""
    answer_of = {}
    for a, g in groups:
        while g:
            low = g & -g
            answer_of[low] = a
            g ^= low
    return [answer_of.get(b, 0) for b in bits]


def _mask_at(seen: dict[int, int], get: Callable[[int, int], int], block_hashes: Sequence[int], i: int) -> int:
    m = seen.get(i)
    if m is None:
        m = seen[i] = get(block_hashes[i], 0)
    return m


def _probe_masks(
    a: int, guess: int, n: int, seen: dict[int, int], get: Callable[[int, int], int], block_hashes: Sequence[int]
) -> tuple[int, int]:
    """The blocks the former search with `guess` probes when a replica holds exactly the
    first `a`: (AND of the masks of those before a, OR of those from a on). A replica
    whose bit is in the first and not in the second is answered `a` by that search."""
    probes = [guess - 1]
    if guess <= a:  # block guess - 1 held
        probes.append(guess)
        lo, hi = guess + 1, n - 1
    else:
        lo, hi = 1, guess - 1
    while lo < hi:
        mid = (lo + hi) // 2
        probes.append(mid)
        if mid < a:
            lo = mid + 1
        else:
            hi = mid
    before, after = -1, 0  # -1: every bit
    for i in probes:
        m = seen.get(i)  # _mask_at, inlined
        if m is None:
            m = seen[i] = get(block_hashes[i], 0)
        if i < a:
            before &= m
        else:
            after |= m
    return before, after


def _search(
    seen: dict[int, int], get: Callable[[int, int], int], block_hashes: Sequence[int], bit: int, n: int, guess: int
) -> int:
    """The former per-replica match: binary search for the longest held prefix (block i
    held iff `bit` is in its mask), trying a previous replica's answer `guess` first."""
    if not _mask_at(seen, get, block_hashes, 0) & bit:
        return 0
    if _mask_at(seen, get, block_hashes, n - 1) & bit:
        return n
    # Invariant: block lo - 1 held, block hi not held.
    lo, hi = 1, n - 1
    if guess:
        if _mask_at(seen, get, block_hashes, guess - 1) & bit:
            if not _mask_at(seen, get, block_hashes, guess) & bit:
                return guess
            lo = guess + 1
        else:
            hi = guess - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if _mask_at(seen, get, block_hashes, mid) & bit:
            lo = mid + 1
        else:
            hi = mid
    return lo


__all__ = ["DEFAULT_CAPACITY_BLOCKS", "PrefixIndex"]
