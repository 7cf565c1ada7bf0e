"""What the gateway knows of the fleet: running engine replicas per pool and gateway
replicas, refreshed by the Serve glue (deployments.gateway polls the controller)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cluster.config import ClusterConfig


@dataclass
class FleetStatus:
    replicas: dict[str, int]
    min_replicas: dict[str, int]
    gateways: int = 1
    ready: bool = False
    detail: str = "waiting for the first status poll"

    @classmethod
    def from_config(cls, cfg: ClusterConfig) -> FleetStatus:
        # Until the first poll the configured start counts stand in.
        return cls(
            replicas={p.name: p.start_replicas for p in cfg.pools},
            min_replicas={p.name: p.min_replicas for p in cfg.pools},
        )

    def update(self, running: Mapping[str, int], gateways: int) -> None:
        """Readiness: every pool with min_replicas > 0 has a running engine replica."""
        self.replicas = {name: int(running.get(name, 0)) for name in self.replicas}
        self.gateways = max(1, gateways)
        missing = [f"{n}: 0 running replicas" for n, k in self.replicas.items() if k == 0 and self.min_replicas[n] > 0]
        self.ready = not missing
        self.detail = "; ".join(missing) or "all pools have running replicas"

    def failed(self, reason: str) -> None:
        """The controller could not be asked (it may be restarting): keep the last counts."""
        self.detail = f"status poll failed: {reason}"

    def snapshot(self) -> tuple[Mapping[str, int], int]:
        return self.replicas, self.gateways


__all__ = ["FleetStatus"]
