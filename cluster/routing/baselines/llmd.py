"""Baseline: llm-d's inference scheduler with its default weighted scorers.

score = 3 * prefix + 2 * queue + 2 * kv, each scorer in [0, 1]:
* prefix: share of the prompt's blocks the replica is believed to cache (llm-d's
  prefix-cache scorer keeps an approximate per-pod block index, LRU);
* queue: (max_q - q) / (max_q - min_q) over the candidates, 1 when all equal, with q the
  waiting queue (engine-reported waiting plus this router's unreported in-flight);
* kv: 1 - KV cache utilisation.
The highest total wins, ties at random; the prompt's blocks are recorded for it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from cluster.routing.policy import ReplicaView, RouteDecision, RouteRequest
from cluster.routing.prefix_index import DEFAULT_CAPACITY_BLOCKS, PrefixIndex


class LlmdScorerPolicy:
    name = "llmd"

    def __init__(
        self,
        *,
        block_size: int = 16,
        prefix_weight: float = 3.0,
        queue_weight: float = 2.0,
        kv_weight: float = 2.0,
        default_capacity_blocks: int = DEFAULT_CAPACITY_BLOCKS,
        seed: int | None = None,
    ) -> None:
        self.prefix_weight = prefix_weight
        self.queue_weight = queue_weight
        self.kv_weight = kv_weight
        self.index = PrefixIndex(default_capacity_blocks)
        self._rng = random.Random(seed)

    def choose(self, request: RouteRequest, replicas: Sequence[ReplicaView]) -> RouteDecision:
        blocks = request.block_hashes
        queues = [r.num_waiting + r.in_flight for r in replicas]
        q_min, q_max = min(queues), max(queues)
        scores: dict[str, float] = {}
        matched: dict[str, int] = {}
        best: tuple[float, float] | None = None
        chosen = replicas[0]
        for r in replicas:
            self.index.set_capacity(r.replica_id, r.kv_capacity_blocks)
        hits = self.index.match_many([r.replica_id for r in replicas], blocks)
        for r, q, m in zip(replicas, queues, hits, strict=True):
            matched[r.replica_id] = m
            prefix = m / len(blocks) if blocks else 0.0
            queue = 1.0 if q_max == q_min else (q_max - q) / (q_max - q_min)
            kv = 1.0 - min(1.0, max(0.0, r.kv_usage))
            total = self.prefix_weight * prefix + self.queue_weight * queue + self.kv_weight * kv
            scores[r.replica_id] = total
            key = (total, self._rng.random())
            if best is None or key > best:
                best, chosen = key, r
        self.index.insert(chosen.replica_id, blocks)
        return RouteDecision(
            replica_id=chosen.replica_id, matched_blocks=matched[chosen.replica_id], reason="weighted", scores=scores
        )

    def on_finished(self, request: RouteRequest, replica_id: str, output_block_hashes: Sequence[int]) -> None:
        pass  # llm-d's prefix scorer records prompts when it schedules them

    def on_replicas_changed(self, replica_ids: Sequence[str]) -> None:
        self.index.retain(replica_ids)
