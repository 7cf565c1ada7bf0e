"""Baseline: SGLang's cache-aware router (sgl-router `cache_aware` policy).

1. If the system is imbalanced -- busiest minus idlest load above `balance_abs_threshold`
   (64) *and* busiest above `balance_rel_threshold` (1.5) times the idlest -- route to
   the least-loaded replica.
2. Otherwise find the replica with the longest cached-prefix match; if the matched share
   of the prompt exceeds `cache_threshold` (0.3), route there; else route to the replica
   whose tree is smallest (most free cache).
3. The routed prompt is recorded for the chosen replica (prompts only).

SGLang keeps an approximate radix tree per worker; we give it the same per-replica block
index as our policy (`PrefixIndex`, engine granularity, LRU bounded by KV capacity), so a
comparison isolates the decision rule.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from cluster.routing.policy import ReplicaView, RouteDecision, RouteRequest
from cluster.routing.prefix_index import DEFAULT_CAPACITY_BLOCKS, PrefixIndex


class SglangCacheAwarePolicy:
    name = "sglang"

    def __init__(
        self,
        *,
        block_size: int = 16,
        cache_threshold: float = 0.3,
        balance_abs_threshold: int = 64,
        balance_rel_threshold: float = 1.5,
        default_capacity_blocks: int = DEFAULT_CAPACITY_BLOCKS,
        seed: int | None = None,
    ) -> None:
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.index = PrefixIndex(default_capacity_blocks)
        self._rng = random.Random(seed)

    def choose(self, request: RouteRequest, replicas: Sequence[ReplicaView]) -> RouteDecision:
        for r in replicas:
            self.index.set_capacity(r.replica_id, r.kv_capacity_blocks)
        loads = [r.load for r in replicas]
        max_load, min_load = max(loads), min(loads)
        blocks = request.block_hashes
        matched = 0
        if max_load - min_load > self.balance_abs_threshold and max_load > self.balance_rel_threshold * min_load:
            chosen = min(replicas, key=lambda r: (r.load, self._rng.random()))
            reason = "imbalanced"
        else:
            hits = self.index.match_many([r.replica_id for r in replicas], blocks)
            best = max(range(len(replicas)), key=lambda i: (hits[i], -replicas[i].load, self._rng.random()))
            if blocks and hits[best] / len(blocks) > self.cache_threshold:
                chosen, reason, matched = replicas[best], "cache-hit", hits[best]
            else:
                small = min(
                    range(len(replicas)),
                    key=lambda i: (self.index.num_blocks(replicas[i].replica_id), self._rng.random()),
                )
                chosen, reason, matched = replicas[small], "smallest-tree", hits[small]
        self.index.insert(chosen.replica_id, blocks)
        return RouteDecision(replica_id=chosen.replica_id, matched_blocks=matched, reason=reason)

    def on_finished(self, request: RouteRequest, replica_id: str, output_block_hashes: Sequence[int]) -> None:
        pass  # the SGLang router records request text at routing time only

    def on_replicas_changed(self, replica_ids: Sequence[str]) -> None:
        self.index.retain(replica_ids)
