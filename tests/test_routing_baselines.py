"""Each baseline behaves as the router it mirrors, on crafted cases."""

from __future__ import annotations

import random
from collections import Counter

from cluster.routing.baselines import (
    CharTreePolicy,
    LlmdScorerPolicy,
    PowerOfTwoPolicy,
    RandomPolicy,
    RoundRobinPolicy,
    SglangCacheAwarePolicy,
)
from cluster.routing.block_hash import chain_block_hashes
from cluster.routing.policy import ReplicaView, RouteRequest

B = 16


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(32768) for _ in range(n)]


def req(toks: list[int], text: str | None = None) -> RouteRequest:
    return RouteRequest("q", len(toks), chain_block_hashes(toks, B), text=text)


def views(loads: dict[str, int] | None = None, kv: dict[str, float] | None = None, n: int = 4) -> list[ReplicaView]:
    loads, kv = loads or {}, kv or {}
    return [
        ReplicaView(
            f"r{i}", num_waiting=loads.get(f"r{i}", 0), kv_usage=kv.get(f"r{i}", 0.0), kv_capacity_blocks=10_000
        )
        for i in range(n)
    ]


def test_random_covers_all_replicas() -> None:
    p = RandomPolicy(seed=0)
    seen = Counter(p.choose(req(tokens(1, 64)), views()).replica_id for _ in range(400))
    assert set(seen) == {"r0", "r1", "r2", "r3"}
    assert min(seen.values()) > 50


def test_round_robin_cycles_in_order() -> None:
    p = RoundRobinPolicy()
    got = [p.choose(req(tokens(1, 64)), list(reversed(views()))).replica_id for _ in range(8)]
    assert got == ["r0", "r1", "r2", "r3"] * 2


def test_pow2_never_picks_the_most_loaded_and_prefers_lighter() -> None:
    p = PowerOfTwoPolicy(seed=0)
    vs = views({"r0": 9, "r1": 1, "r2": 5, "r3": 3})
    seen = Counter(p.choose(req(tokens(1, 64)), vs).replica_id for _ in range(600))
    assert seen["r0"] == 0
    assert seen["r1"] > seen["r3"] > seen["r2"]


def test_char_tree_sends_shared_text_prefix_to_its_holder() -> None:
    p = CharTreePolicy(seed=0)
    system = "You are a meticulous assistant for the billing team. " * 20
    first = p.choose(req(tokens(1, 64), text=system + "Q1"), views()).replica_id
    for k in range(5):
        d = p.choose(req(tokens(2, 64), text=system + f"question {k}"), views())
        assert d.replica_id == first and d.reason == "prefix-match"


def test_char_tree_low_match_rate_goes_to_smallest_tenant() -> None:
    p = CharTreePolicy(seed=0)
    p.tree.insert("x" * 500, "r0")
    p.tree.insert("y" * 300, "r1")
    p.tree.insert("z" * 100, "r2")
    p.tree.insert("w" * 50, "r3")
    d = p.choose(req(tokens(1, 64), text="x" * 5 + "completely different text " * 10), views())
    assert d.replica_id == "r3" and d.reason == "smallest-tenant"


def test_char_tree_imbalance_falls_back_to_pow2() -> None:
    p = CharTreePolicy(seed=0, imbalanced_threshold=20)
    p.tree.insert("shared prefix " * 50, "r0")
    vs = views({"r0": 50})
    seen = Counter(p.choose(req(tokens(1, 64), text="shared prefix " * 50), vs).replica_id for _ in range(50))
    assert seen["r0"] == 0


def test_char_tree_matches_block_hashes_without_text() -> None:
    p = CharTreePolicy(seed=0)
    system = tokens(1, 1024)
    first = p.choose(req(system + tokens(2, 32)), views()).replica_id
    d = p.choose(req(system + tokens(3, 32)), views())
    assert d.replica_id == first and d.matched_blocks == 1024 // B


def test_char_tree_forgets_removed_replicas() -> None:
    p = CharTreePolicy(seed=0)
    p.tree.insert("abc" * 100, "r0")
    p.on_replicas_changed(["r1", "r2", "r3"])
    assert "r0" not in p.tree.tenant_chars
    assert p.tree.prefix_match("abc" * 100, ["r0"])[0] == 0


def test_sglang_cache_hit_above_threshold_goes_to_holder() -> None:
    p = SglangCacheAwarePolicy(seed=0)
    system = tokens(1, 1024)
    p.index.insert("r2", chain_block_hashes(system, B))
    d = p.choose(req(system + tokens(2, 320)), views())  # 64 of 84 blocks matched > 0.3
    assert d.replica_id == "r2" and d.reason == "cache-hit"


def test_sglang_low_match_goes_to_smallest_tree() -> None:
    p = SglangCacheAwarePolicy(seed=0)
    for i, n in enumerate((300, 200, 50, 100)):
        p.index.insert(f"r{i}", chain_block_hashes(tokens(10 + i, n * B), B))
    system = tokens(1, 160)
    p.index.insert("r0", chain_block_hashes(system, B))
    d = p.choose(req(system + tokens(2, 1600)), views())  # 10 of 110 blocks matched < 0.3
    assert d.replica_id == "r2" and d.reason == "smallest-tree"


def test_sglang_imbalance_routes_to_least_loaded() -> None:
    p = SglangCacheAwarePolicy(seed=0)
    system = tokens(1, 1024)
    p.index.insert("r0", chain_block_hashes(system, B))
    d = p.choose(req(system), views({"r0": 200, "r1": 100, "r2": 100, "r3": 90}))
    assert d.replica_id == "r3" and d.reason == "imbalanced"


def test_llmd_prefers_prefix_holder_at_equal_load() -> None:
    p = LlmdScorerPolicy(seed=0)
    system = tokens(1, 1024)
    p.index.insert("r1", chain_block_hashes(system, B))
    d = p.choose(req(system), views())
    assert d.replica_id == "r1"
    assert d.scores["r1"] == 3 + 2 + 2


def test_llmd_queue_and_kv_can_outweigh_prefix() -> None:
    p = LlmdScorerPolicy(seed=0)
    system = tokens(1, 1024)
    p.index.insert("r1", chain_block_hashes(system, B))
    d = p.choose(req(system), views({"r1": 10}, {"r1": 0.9}))
    assert d.replica_id != "r1"
    assert abs(d.scores["r1"] - (3 + 0 + 2 * 0.1)) < 1e-9
