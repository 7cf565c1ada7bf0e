"""Baseline: replicas in turn, blind to load and cache."""

from __future__ import annotations

import random
from collections.abc import Sequence

from cluster.routing.policy import ReplicaView, RouteDecision, RouteRequest


class RoundRobinPolicy:
    name = "round-robin"

    def __init__(self, *, block_size: int = 16, seed: int | None = None) -> None:
        # Routers in different gateways start at different offsets (seed) so they do not
        # all send their first request to the same replica.
        self._next = 0 if seed is None else random.Random(seed).randrange(1 << 16)

    def choose(self, request: RouteRequest, replicas: Sequence[ReplicaView]) -> RouteDecision:
        # Ordered by id so the turn order survives the caller reordering its list.
        ordered = sorted(replicas, key=lambda r: r.replica_id)
        chosen = ordered[self._next % len(ordered)]
        self._next += 1
        return RouteDecision(replica_id=chosen.replica_id, reason="round-robin")

    def on_finished(self, request: RouteRequest, replica_id: str, output_block_hashes: Sequence[int]) -> None:
        pass

    def on_replicas_changed(self, replica_ids: Sequence[str]) -> None:
        pass
