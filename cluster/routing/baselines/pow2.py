"""Baseline: power of two choices, Ray Serve's default request router.

Two distinct replicas drawn at random; the one with fewer ongoing requests wins (Ray
compares the replicas' queue lengths; here `ReplicaView.load`), ties broken randomly.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from cluster.routing.policy import ReplicaView, RouteDecision, RouteRequest


def pick_pow2(replicas: Sequence[ReplicaView], rng: random.Random) -> ReplicaView:
    """Ray's two-choice draw, shared with the char-tree baseline's fallback."""
    n = len(replicas)
    if n == 1:
        return replicas[0]
    i = rng.randrange(n)
    j = rng.randrange(n - 1)
    if j >= i:
        j += 1
    a, b = replicas[i], replicas[j]
    if a.load == b.load:
        return a if rng.getrandbits(1) else b
    return a if a.load < b.load else b


class PowerOfTwoPolicy:
    name = "pow2"

    def __init__(self, *, block_size: int = 16, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def choose(self, request: RouteRequest, replicas: Sequence[ReplicaView]) -> RouteDecision:
        return RouteDecision(replica_id=pick_pow2(replicas, self._rng).replica_id, reason="pow2")

    def on_finished(self, request: RouteRequest, replica_id: str, output_block_hashes: Sequence[int]) -> None:
        pass

    def on_replicas_changed(self, replica_ids: Sequence[str]) -> None:
        pass
