"""Routing as a recorded run did it: each request goes to the replica a real router chose.

Checking the simulator's timing against a real replay compares two things at once: where
the requests went and how long they took there. On a trace of a few dozen requests the
first can decide a p90 alone: with two system prompts, whether the second one's first
request lands beside the first is a tie the cache-aware policy breaks at random (the
simulator splits the 34 requests of the e2e timing test's trace 18 / 16 over two replicas
in one seed of six and keeps them on one in the others; the real router did the same,
one way or the other, run by run). Replaying the real run's choices in the simulator
leaves only the timing model to compare.

Replicas are matched in the order this policy first meets their labels (the first label
routed to is the pool's first simulated replica, and so on): the replicas of a pool are
alike and start with empty caches, so only which requests share a replica matters, not
its name. One object per pool, as the simulator makes them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from cluster.routing.policy import ReplicaView, RouteDecision, RouteRequest


class RecordedRoutes:
    """A routing policy that replays recorded choices: `routes` maps a request id to the
    label of the replica it was served by (any labels; see the module docstring)."""

    name = "recorded"

    def __init__(self, routes: Mapping[str, str]) -> None:
        self._routes = dict(routes)
        self._slot: dict[str, int] = {}  # label -> index into the pool's replicas

    @property
    def replicas_used(self) -> int:
        return len(self._slot)

    def choose(self, request: RouteRequest, replicas: Sequence[ReplicaView]) -> RouteDecision:
        label = self._routes.get(request.request_id)
        if label is None:
            raise KeyError(f"no recorded route for request {request.request_id!r}")
        slot = self._slot.setdefault(label, len(self._slot))
        if slot >= len(replicas):
            raise ValueError(f"the recorded run used {self.replicas_used} replicas; the simulator has {len(replicas)}")
        return RouteDecision(replica_id=replicas[slot].replica_id, reason="recorded")

    def on_finished(self, request: RouteRequest, replica_id: str, output_block_hashes: Sequence[int]) -> None:
        pass

    def on_replicas_changed(self, replica_ids: Sequence[str]) -> None:
        pass


__all__ = ["RecordedRoutes"]
