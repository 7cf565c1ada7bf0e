"""PrefixIndex: matching, LRU eviction like vLLM's free-block queue, bounded memory."""

from __future__ import annotations

import random
from collections import OrderedDict

from cluster.routing.block_hash import chain_block_hashes
from cluster.routing.prefix_index import PrefixIndex

B = 4


def chain(seed: int, n_blocks: int, prefix: list[int] | None = None) -> list[int]:
    rng = random.Random(seed)
    tokens = (prefix or []) + [rng.randrange(32768) for _ in range(n_blocks * B)]
    return chain_block_hashes(tokens, B)


def test_match_counts_leading_held_blocks() -> None:
    idx = PrefixIndex(default_capacity_blocks=1000)
    shared = [7] * (5 * B)
    a = chain(1, 5, shared)  # 10 blocks, first 5 shared
    b = chain(2, 3, shared)
    idx.insert("r0", a)
    assert idx.match("r0", a) == 10
    assert idx.match("r0", b) == 5
    assert idx.match("r1", a) == 0
    assert idx.match("r0", []) == 0
    assert idx.num_blocks("r0") == 10


def test_lru_evicts_deepest_blocks_of_oldest_request_first() -> None:
    idx = PrefixIndex(default_capacity_blocks=64)
    a, b = chain(1, 40), chain(2, 40)
    idx.insert("r", a)
    idx.insert("r", b)
    assert idx.num_blocks("r") == 64
    assert idx.match("r", b) == 40  # the newest request is whole
    assert idx.match("r", a) == 24  # A lost its 16 deepest blocks, kept its prefix


def test_recently_used_prefix_survives_eviction() -> None:
    idx = PrefixIndex(default_capacity_blocks=64)
    a, b, c = chain(1, 20), chain(2, 20), chain(3, 40)
    idx.insert("r", a)
    idx.insert("r", b)
    idx.insert("r", a)  # A is used again: B is now the least recently used
    idx.insert("r", c)
    assert idx.match("r", a) == 20
    assert idx.match("r", b) < 20
    assert idx.match("r", c) == 40


def test_eviction_forgets_what_the_engine_evicted() -> None:
    idx = PrefixIndex(default_capacity_blocks=100)
    old = chain(1, 50)
    idx.insert("r", old)
    for seed in range(2, 12):  # 500 blocks of newer traffic through a 100-block cache
        idx.insert("r", chain(seed, 50))
    assert idx.match("r", old) == 0
    assert idx.num_blocks("r") <= 100


def test_shrinking_capacity_evicts_at_once() -> None:
    idx = PrefixIndex(default_capacity_blocks=1000)
    a = chain(1, 100)
    idx.insert("r", a)
    idx.set_capacity("r", 30)
    assert idx.num_blocks("r") == 30
    assert idx.match("r", a) == 30  # the prefix stays, the tail goes


def test_kv_event_removal() -> None:
    idx = PrefixIndex(default_capacity_blocks=1000)
    a = chain(1, 10)
    idx.insert("r", a)
    idx.remove("r", a[6:])
    assert idx.match("r", a) == 6


def test_hot_working_set_keeps_bookkeeping_bounded() -> None:
    idx = PrefixIndex(default_capacity_blocks=256, generations=8)
    hot = [chain(s, 10) for s in range(10)]  # 100 blocks, well under capacity
    for i in range(5000):
        idx.insert("r", hot[i % 10])
    blocks = idx._replicas["r"]
    assert idx.num_blocks("r") == 100
    assert sum(len(lst) for lst in blocks.lists) <= 3 * 256
    assert all(idx.match("r", h) == 10 for h in hot)


def test_retain_forgets_departed_replicas() -> None:
    idx = PrefixIndex()
    a = chain(1, 4)
    idx.insert("r0", a)
    idx.insert("r1", a)
    idx.retain(["r1"])
    assert idx.replica_ids() == ["r1"]
    assert idx.match("r0", a) == 0 and idx.match("r1", a) == 4
    assert len(idx) == 4


class ExactLru:
    """Reference: exact block LRU, deepest block of a request evicted first (vLLM order)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.blocks: OrderedDict[int, None] = OrderedDict()

    def insert(self, hashes: list[int]) -> None:
        for h in reversed(hashes):
            self.blocks[h] = None
            self.blocks.move_to_end(h)
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)

    def match(self, hashes: list[int]) -> int:
        n = 0
        for h in hashes:
            if h not in self.blocks:
                break
            n += 1
        return n


def test_agrees_with_exact_lru_on_a_multi_turn_workload() -> None:
    rng = random.Random(0)
    idx, ref = PrefixIndex(default_capacity_blocks=2000), ExactLru(2000)
    system = [rng.randrange(32768) for _ in range(64 * B)]
    convs: list[list[int]] = []
    agree = total = 0
    for _ in range(3000):
        if convs and rng.random() < 0.7:
            k = rng.randrange(len(convs))
            convs[k] = convs[k] + [rng.randrange(32768) for _ in range(rng.randrange(8, 80))]
            tokens = convs[k]
        else:
            tokens = system + [rng.randrange(32768) for _ in range(rng.randrange(16, 400))]
            convs.append(tokens)
        hashes = chain_block_hashes(tokens, B)
        total += 1
        agree += idx.match("r", hashes) == ref.match(hashes)
        idx.insert("r", hashes)
        ref.insert(hashes)
    print(f"agreement with exact LRU: {agree}/{total}")
    assert agree / total >= 0.95


def test_pinned_blocks_survive_eviction_and_rejoin_the_lru_when_unpinned() -> None:
    idx = PrefixIndex(default_capacity_blocks=64)
    a = chain(1, 40)
    idx.pin("r", a)
    for seed in range(2, 8):  # 240 blocks of other traffic
        idx.insert("r", chain(seed, 40))
    assert idx.match("r", a) == 40
    assert idx.num_blocks("r") <= 64 + 40  # the rest was evicted around the pin
    idx.unpin("r", a)
    assert idx.pinned_blocks("r") == 0
    assert idx.match("r", a) == 40  # released: most recently used, not gone
    for seed in range(8, 12):
        idx.insert("r", chain(seed, 40))
    assert idx.match("r", a) < 40


def test_a_block_pinned_twice_needs_both_unpins() -> None:
    idx = PrefixIndex(default_capacity_blocks=40)
    shared = [7] * (20 * B)
    a, b = chain(1, 10, shared), chain(2, 10, shared)
    idx.pin("r", a)
    idx.pin("r", b)
    idx.unpin("r", a)
    for seed in range(3, 9):
        idx.insert("r", chain(seed, 40))
    assert idx.match("r", b) == 30  # b (with the shared 20 blocks) is still pinned
    assert idx.match("r", a) == 20


def test_everything_pinned_holds_more_than_capacity_without_looping() -> None:
    idx = PrefixIndex(default_capacity_blocks=50)
    chains = [chain(k, 30) for k in range(4)]
    for c in chains:
        idx.pin("r", c)
    assert all(idx.match("r", c) == 30 for c in chains)
    assert idx.num_blocks("r") == 120
