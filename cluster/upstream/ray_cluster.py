"""Several Ray nodes on one machine (Ray 2.60's `ray.cluster_utils.Cluster`, a
DeveloperAPI that Ray's own multi-node tests use; its nodes are `ray._private.node.Node`).

Each node is a raylet of its own (with its object store and workers) joined to one GCS,
so node-level behaviour (placement groups packed on one node, custom node resources,
a node lost with everything on it) can be exercised without a second machine.
"""

from __future__ import annotations

import os
import signal
from typing import Any

# The node's process-table key for its raylet (ray._private.ray_constants.PROCESS_TYPE_RAYLET).
_RAYLET = "raylet"


def start_head(
    *, num_cpus: int, resources: dict[str, float], gcs_port: int, object_store_bytes: int, system_config: dict[str, Any]
) -> Any:
    """A Cluster with its head node started (GCS on `gcs_port`); nothing connected yet."""
    from ray.cluster_utils import Cluster

    return Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": num_cpus,
            "resources": resources,
            "gcs_server_port": gcs_port,
            "object_store_memory": object_store_bytes,
            "include_dashboard": False,
            "_system_config": system_config,
        },
    )


def add_node(cluster: Any, *, num_cpus: int, resources: dict[str, float], object_store_bytes: int) -> Any:
    """Start one more raylet joined to `cluster`; returns once the GCS lists it."""
    return cluster.add_node(num_cpus=num_cpus, resources=resources, object_store_memory=object_store_bytes)


def node_id(node: Any) -> str:
    """The node's Ray node id (hex), as `ray.get_runtime_context().get_node_id()` gives it."""
    return str(node.node_id)


def raylet_pid(node: Any) -> int:
    return int(node.all_processes[_RAYLET][0].process.pid)


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it (a raylet's workers, their engine processes)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [pid] + [p.pid for p in root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_node(cluster: Any, node: Any) -> list[int]:
    """Lose `node` the way a machine is lost: SIGKILL its raylet and every process under
    it at once (workers, replicas, their vLLM engine processes; none gets to say goodbye),
    then drop the node's remaining processes (object store, agents) from the cluster.
    Returns the pids killed."""
    pids = process_tree(raylet_pid(node))
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    cluster.remove_node(node, allow_graceful=False)
    return pids


def shutdown(cluster: Any) -> None:
    cluster.shutdown()
