"""How long a new engine replica of a pool takes before it serves, from the typed config:
node provisioning (only when no node of the pool has a free slot), weight loading at the
configured bandwidth from the profile's weight bytes, and engine start (torch.compile,
CUDA-graph capture, warm-up). The simulator starts replicas with it and the SLO policy
looks this far ahead."""

from __future__ import annotations

from dataclasses import dataclass

from cluster.config import ClusterConfig, PoolConfig


@dataclass(frozen=True)
class ColdStart:
    node_provision_s: float
    weight_load_s: float
    engine_start_s: float

    @property
    def on_free_slot_s(self) -> float:
        """A replica placed on a node the pool already has (TP=4: two replicas per node)."""
        return self.weight_load_s + self.engine_start_s

    @property
    def on_new_node_s(self) -> float:
        return self.node_provision_s + self.on_free_slot_s


def cold_start(cfg: ClusterConfig, pool: PoolConfig) -> ColdStart:
    c = pool.autoscaling.cold_start
    weights = cfg.memory_plan(pool).weight_bytes_total
    return ColdStart(
        node_provision_s=c.node_provision_s,
        weight_load_s=weights / (c.weight_load_gb_per_s * 1e9),
        engine_start_s=c.engine_start_s,
    )
