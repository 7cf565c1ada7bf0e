"""The contract every routing policy implements. No Ray imports: the same policy object
decides inside Ray Serve's RequestRouter, in the simulator and in unit tests.

A policy sees requests as chained token-block hashes (see `cluster.routing.block_hash`)
and replicas as `ReplicaView`s (load from `record_routing_stats`). It keeps whatever
state it needs (a prefix index, a round-robin cursor) and is told what happened through
the `on_*` callbacks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


# Slots: a policy reads every candidate's fields on each decision; a slotted object holds
# them inline, with no per-instance dict (no difference the VM's latency bench resolved).
@dataclass(frozen=True, slots=True)
class ReplicaView:
    """What a router knows of one engine replica at decision time."""

    replica_id: str
    num_waiting: int = 0  # requests queued in the engine (not yet scheduled)
    num_running: int = 0  # requests in the running batch
    kv_usage: float = 0.0  # fraction of KV cache blocks in use, 0..1
    max_num_seqs: int = 256
    kv_capacity_blocks: int = 0  # engine's KV blocks; bounds the prefix index
    # Requests this router sent that the replica has not yet reported back on.
    in_flight: int = 0

    @property
    def load(self) -> int:
        return self.num_waiting + self.num_running + self.in_flight


@dataclass(frozen=True)
class RouteRequest:
    """One request as a policy sees it."""

    request_id: str
    prompt_tokens: int
    # Chained hashes of the prompt's full blocks (block i covers tokens 0..(i+1)*B).
    block_hashes: Sequence[int] = ()
    max_tokens: int = 0
    session_id: str | None = None
    # The replica that served this session's last turn, from the session store.
    affinity_replica: str | None = None
    # Prompt text where known (the char-tree baseline matches on it); the simulator,
    # which only has block ids, leaves it None.
    text: str | None = None
    # When the router got the request, in seconds of any monotonic clock: the simulator
    # passes its own clock; None means "now" (time.monotonic()) for live routers.
    arrival_s: float | None = None


@dataclass
class RouteDecision:
    replica_id: str
    matched_blocks: int = 0  # blocks the policy expects the replica to already hold
    reason: str = ""
    scores: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class RoutingPolicy(Protocol):
    """One small object, one decision method (`choose`)."""

    name: str

    def choose(self, request: RouteRequest, replicas: Sequence[ReplicaView]) -> RouteDecision:
        """Pick one of `replicas` (never empty) for `request`."""
        ...

    def on_finished(self, request: RouteRequest, replica_id: str, output_block_hashes: Sequence[int]) -> None:
        """The request completed on `replica_id`; `output_block_hashes` extends the prompt's
        chain with the generated tokens' full blocks (what the engine now caches)."""
        ...

    def on_replicas_changed(self, replica_ids: Sequence[str]) -> None:
        """The set of live replicas changed: forget state of replicas that left."""
        ...
