"""A multi-node Ray cluster on this machine, shaped like the chart's RayService: a head
node (GCS, Serve controller and proxy, the gateway) and one node per worker pod of each
pool, each advertising its pool's resource as the chart's worker groups do
(`helm_values.worker_group(...)["rayResources"]`), so engine placement groups (STRICT_PACK,
one bundle per TP rank, each asking for the pool's resource) land only on their own
pool's nodes. Deploy the app on it with `start_local_cluster(cfg, address=nodes.address)`.

`start_autoscaling_local_nodes` starts the head alone, with Ray's node autoscaler over a
fake provider: each pool's worker group becomes a node type (the same resources, and
the group's minPods/maxPods as min/max workers), and the autoscaler adds a node when a
replica's placement group is pending and removes one idle for the timeout, as the
KubeRay autoscaler does with the chart's pods.

Logical CPUs: a pool node gets exactly what its engine replicas take (TP bundles plus one
CPU per replica actor, merged into the first bundle by ray.serve.llm), the head gets the
gateway's and some headroom; logical CPUs are bookkeeping only (see cluster.ops.local).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from cluster.config import ClusterConfig, PoolConfig
from cluster.ops.helm_values import replicas_per_pod, worker_group
from cluster.ops.local import free_port
from cluster.upstream import ray_cluster
from deployments.serve_config import controller_env

# Small object stores: engines exchange nothing large through them.
OBJECT_STORE_BYTES = 128 * 1024**2
HEAD_CPUS = 4
# Ray notices a lost raylet after health_check_failure_threshold missed checks of
# health_check_period_ms each (defaults: 5 x 3 s); on one machine 3 x 1 s is plenty, and
# a gateway stream from a replica on the lost node waits for that verdict.
HEALTH_CHECK = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3, "health_check_timeout_ms": 1000}


def pool_node_cpus(cfg: ClusterConfig, pool: PoolConfig) -> int:
    return replicas_per_pod(cfg, pool) * (pool.engine.tensor_parallel_size + 1)


@dataclass
class PoolNode:
    pool: str
    node: Any  # ray._private.node.Node

    @property
    def node_id(self) -> str:
        return ray_cluster.node_id(self.node)


@dataclass
class LocalNodes:
    cfg: ClusterConfig
    cluster: Any  # ray.cluster_utils.Cluster
    pool_nodes: list[PoolNode] = field(default_factory=list)
    lost: list[PoolNode] = field(default_factory=list)

    @property
    def address(self) -> str:
        return str(self.cluster.address)

    @property
    def head_node_id(self) -> str:
        return ray_cluster.node_id(self.cluster.head_node)

    def nodes_of(self, pool: str) -> list[PoolNode]:
        return [n for n in self.pool_nodes if n.pool == pool]

    def add_pool_node(self, pool_name: str) -> PoolNode:
        """One more worker pod of `pool_name`'s group (what KubeRay adds on scale-up)."""
        pool = self.cfg.pool(pool_name)
        node = ray_cluster.add_node(
            self.cluster,
            num_cpus=pool_node_cpus(self.cfg, pool),
            resources={k: float(v) for k, v in worker_group(self.cfg, pool)["rayResources"].items()},
            object_store_bytes=OBJECT_STORE_BYTES,
        )
        added = PoolNode(pool_name, node)
        self.pool_nodes.append(added)
        return added

    def kill(self, victim: PoolNode) -> list[int]:
        """Lose `victim` with everything on it (SIGKILL of its raylet's process tree)."""
        self.pool_nodes.remove(victim)
        self.lost.append(victim)
        return ray_cluster.kill_node(self.cluster, victim.node)

    def shutdown(self) -> None:
        ray_cluster.shutdown(self.cluster)


def node_type(cfg: ClusterConfig, pool: PoolConfig) -> dict[str, Any]:
    """The autoscaler node type of `pool`'s worker group (what one of its pods offers)."""
    group = worker_group(cfg, pool)
    resources = {k: float(v) for k, v in group["rayResources"].items()}
    resources.update({"CPU": pool_node_cpus(cfg, pool), "object_store_memory": OBJECT_STORE_BYTES})
    return {"resources": resources, "min_workers": group["minPods"], "max_workers": group["maxPods"]}


def alive_nodes_of(pool: PoolConfig) -> list[str]:
    """Ids of the live Ray nodes that advertise `pool`'s resource (however they joined)."""
    import ray

    return sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and pool.ray_resource in n["Resources"])


def _ray_env() -> None:
    """Workers (the Serve controller's too) inherit the environment of the raylet that
    starts them, so it is set before the nodes start."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    for k, v in controller_env().items():
        os.environ.setdefault(k, v)


def start_autoscaling_local_nodes(cfg: ClusterConfig, *, idle_timeout_s: float) -> LocalNodes:
    """The head alone, with Ray's autoscaler adding and removing the pools' nodes."""
    _ray_env()
    cluster = ray_cluster.start_autoscaling_head(
        num_cpus=HEAD_CPUS,
        gcs_port=free_port(),
        object_store_bytes=OBJECT_STORE_BYTES,
        system_config=HEALTH_CHECK,
        node_types={worker_group(cfg, p)["groupName"]: node_type(cfg, p) for p in cfg.pools},
        idle_timeout_s=idle_timeout_s,
    )
    return LocalNodes(cfg, cluster)


def start_local_nodes(cfg: ClusterConfig, pods: dict[str, int] | None = None) -> LocalNodes:
    """Head plus `pods[pool]` worker nodes per pool (default: the chart's initialPods)."""
    _ray_env()
    cluster = ray_cluster.start_head(
        num_cpus=HEAD_CPUS,
        resources={},
        gcs_port=free_port(),  # never Ray's default 6379 (Redis owns it here)
        object_store_bytes=OBJECT_STORE_BYTES,
        system_config=HEALTH_CHECK,
    )
    nodes = LocalNodes(cfg, cluster)
    try:
        for pool in cfg.pools:
            for _ in range((pods or {}).get(pool.name, worker_group(cfg, pool)["initialPods"])):
                nodes.add_pool_node(pool.name)
    except BaseException:
        nodes.shutdown()
        raise
    return nodes
