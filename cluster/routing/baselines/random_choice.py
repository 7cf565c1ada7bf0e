"""Baseline: a uniformly random replica, blind to load and cache."""

from __future__ import annotations

import random
from collections.abc import Sequence

from cluster.routing.policy import ReplicaView, RouteDecision, RouteRequest


class RandomPolicy:
    name = "random"

    def __init__(self, *, block_size: int = 16, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def choose(self, request: RouteRequest, replicas: Sequence[ReplicaView]) -> RouteDecision:
        return RouteDecision(replica_id=self._rng.choice(replicas).replica_id, reason="random")

    def on_finished(self, request: RouteRequest, replica_id: str, output_block_hashes: Sequence[int]) -> None:
        pass

    def on_replicas_changed(self, replica_ids: Sequence[str]) -> None:
        pass
